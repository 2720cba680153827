"""Image URLs in requests -> encoded image bytes, under the server's policy.

`data:` URLs (base64) always; `file://` paths only under configured folders; `http(s)://` only
when fetching is enabled, then with one deadline and a byte cap enforced while streaming (a
server that lies about or omits Content-Length cannot push more than the cap). Every refusal
is an `APIError` naming the problem: 400 for bad input, 413 for oversized images.

Destinations (http(s)): the host is resolved here and every address it resolves to must be
public: loopback, private, link-local, shared (CGNAT), multicast, reserved and unspecified
addresses are refused, also when wrapped in an IPv6 form (IPv4-mapped, 6to4, Teredo), unless
`allowed_hosts` names the host (`host` or `host:port`). The connection goes to the address that
was checked (the URL's host rides in the Host header and TLS SNI), so a DNS answer that changes
between check and connect cannot redirect it. Redirects are followed by hand, at most
`MAX_REDIRECTS`, each target checked the same way. A failed fetch says only that it failed: the
remote status, error or timing is never echoed (no probing of other hosts through us).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx

from .errors import APIError

MAX_REDIRECTS = 3
FETCH_FAILED = "could not fetch the image from image_url"


MAX_IMAGE_BYTES = 10 * 1024 * 1024     # encoded bytes per image, unless the settings say otherwise


@dataclass(frozen=True)
class ImagePolicy:
    max_bytes: int = MAX_IMAGE_BYTES
    allowed_file_dirs: tuple[Path, ...] = field(default_factory=tuple)
    allow_http: bool = False
    http_timeout_s: float = 10.0
    allowed_hosts: frozenset[str] = frozenset()   # "host" or "host:port", lower case: fetched even if not public

    @classmethod
    def create(cls, max_bytes: int, allowed_file_dirs=(), allow_http: bool = False,
               http_timeout_s: float = 10.0, allowed_hosts=()) -> "ImagePolicy":
        return cls(max_bytes, tuple(Path(d).resolve() for d in allowed_file_dirs), allow_http, http_timeout_s,
                   frozenset(h.lower() for h in allowed_hosts))

    def too_large(self) -> APIError:
        return APIError(413, f"image is larger than {self.max_bytes} bytes", param="image_url")


def refused_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for every address that is not plainly public (checked through IPv6 wrappings)."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is not None and refused_address(inner):
            return True
    return (not ip.is_global or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
            or ip.is_reserved or ip.is_unspecified)


@dataclass(frozen=True)
class Destination:
    url: str          # the URL with its host replaced by the checked address
    host: str         # the URL's host (Host header, TLS SNI)
    host_header: str


async def check_destination(url: str, policy: ImagePolicy) -> Destination:
    """Resolve the URL's host and check its addresses; `APIError` 400 when refused."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise APIError(400, "image_url is not a valid http(s) URL", param="image_url")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise APIError(400, "image_url has an invalid port", param="image_url") from None
    allowed = host in policy.allowed_hosts or f"{host}:{port}" in policy.allowed_hosts
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise APIError(400, FETCH_FAILED, param="image_url") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses or (not allowed and any(refused_address(a) for a in addresses)):
        raise APIError(400, "image_url points to a loopback, private or otherwise non-public address; this server "
                            "fetches images from public hosts only", param="image_url")
    ip = addresses[0]
    netloc = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    default_port = port == (443 if parts.scheme == "https" else 80)
    return Destination(parts._replace(netloc=netloc).geturl(), host,
                       parts.hostname if default_port else f"{parts.hostname}:{port}")


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
    client = client or new_http_client()
    try:
        # one deadline for the whole fetch, redirects included (httpx's own timeouts are per
        # read, so a slow drip could otherwise last max_bytes reads)
        async with asyncio.timeout(policy.http_timeout_s):
            for _ in range(MAX_REDIRECTS + 1):
                dest = await check_destination(url, policy)
                request = client.build_request("GET", dest.url, headers={"Host": dest.host_header},
                                               extensions={"sni_hostname": dest.host})
                r = await client.send(request, stream=True)
                try:
                    if r.is_redirect and "location" in r.headers:
                        url = urljoin(url, r.headers["location"])
                        continue
                    if r.status_code != 200:
                        raise APIError(400, FETCH_FAILED, param="image_url")
                    return await _read_capped(r, policy)
                finally:
                    await r.aclose()
            raise APIError(400, f"{FETCH_FAILED}: more than {MAX_REDIRECTS} redirects", param="image_url")
    except (httpx.HTTPError, TimeoutError, OSError):
        raise APIError(400, FETCH_FAILED, param="image_url") from None
    finally:
        if own:
            await client.aclose()


async def _read_capped(r: httpx.Response, policy: ImagePolicy) -> bytes:
    declared = r.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
        raise policy.too_large()
    buf = bytearray()
    async for chunk in r.aiter_bytes():
        buf += chunk
        if len(buf) > policy.max_bytes:
            raise policy.too_large()
    return bytes(buf)


def new_http_client() -> httpx.AsyncClient:
    """The client image fetches use: redirects are followed by `_fetch` itself, checked hop by hop;
    no proxy from the environment (it would connect somewhere other than the checked address)."""
    return httpx.AsyncClient(follow_redirects=False, trust_env=False)
