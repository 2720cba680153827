"""Image URLs in requests -> encoded image bytes, under the server's policy.

`data:` URLs (base64) always; `file://` paths only under configured folders; `http(s)://` only
when fetching is enabled, then with one deadline and a byte cap enforced while streaming (a
server that lies about or omits Content-Length cannot push more than the cap). Every refusal
is an `APIError` naming the problem: 400 for bad input, 413 for oversized images.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .protocol import APIError


@dataclass(frozen=True)
class ImagePolicy:
    max_bytes: int = 10 * 1024 * 1024
    allowed_file_dirs: tuple[Path, ...] = field(default_factory=tuple)
    allow_http: bool = False
    http_timeout_s: float = 10.0

    @classmethod
    def create(cls, max_bytes: int, allowed_file_dirs=(), allow_http: bool = False,
               http_timeout_s: float = 10.0) -> "ImagePolicy":
        return cls(max_bytes, tuple(Path(d).resolve() for d in allowed_file_dirs), allow_http, http_timeout_s)

    def too_large(self) -> APIError:
        return APIError(413, f"image is larger than {self.max_bytes} bytes", param="image_url")


async def read_image_url(url: str, policy: ImagePolicy, client: httpx.AsyncClient | None = None) -> bytes:
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise APIError(400, "image data URLs must be base64-encoded", param="image_url")
        if len(payload) * 3 // 4 > policy.max_bytes:
            raise policy.too_large()
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "image data URL is not valid base64", param="image_url") from None
    if url.startswith("file://"):
        path = Path(url[len("file://"):]).resolve()
        if not any(path.is_relative_to(d) for d in policy.allowed_file_dirs):
            raise APIError(400, "file:// image paths are only allowed under the configured folders",
                           param="image_url")
        if not path.is_file():
            raise APIError(400, f"image file {path} does not exist", param="image_url")
        if path.stat().st_size > policy.max_bytes:
            raise policy.too_large()
        return path.read_bytes()
    if url.startswith(("http://", "https://")):
        if not policy.allow_http:
            raise APIError(400, "fetching images over http(s) is disabled on this server", param="image_url")
        return await _fetch(url, policy, client)
    raise APIError(400, "image_url must be a data: URL (or file:// / http(s):// where enabled)", param="image_url")


async def _fetch(url: str, policy: ImagePolicy, client: httpx.AsyncClient | None) -> bytes:
    own = client is None
    client = client or httpx.AsyncClient(follow_redirects=True, max_redirects=3)
    try:
        # one deadline for the whole fetch (httpx's own timeouts are per read, so a slow drip
        # could otherwise last max_bytes reads)
        async with asyncio.timeout(policy.http_timeout_s), client.stream("GET", url) as r:
            if r.status_code != 200:
                raise APIError(400, f"fetching the image returned HTTP {r.status_code}", param="image_url")
            declared = r.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
                raise policy.too_large()
            buf = bytearray()
            async for chunk in r.aiter_bytes():
                buf += chunk
                if len(buf) > policy.max_bytes:
                    raise policy.too_large()
            return bytes(buf)
    except (httpx.TimeoutException, TimeoutError):
        raise APIError(400, f"fetching the image timed out after {policy.http_timeout_s} s",
                       param="image_url") from None
    except httpx.HTTPError as e:
        raise APIError(400, f"cannot fetch the image: {e}", param="image_url") from None
    finally:
        if own:
            await client.aclose()
