"""Image URL policy: data URLs, file:// allowlist, and http(s) fetching with a deadline and a byte cap."""

import asyncio
import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from deployments.media import ImagePolicy, read_image_url
from deployments.protocol import APIError

pytestmark = pytest.mark.timeout(60)


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


PNG = png_bytes()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/ok.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)
        elif self.path == "/declared-big":
            self.send_response(200)
            self.send_header("Content-Length", str(10 ** 9))
            self.end_headers()
        elif self.path == "/undeclared-big":   # no Content-Length: the cap must hold while streaming
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"x" * 1024)
        elif self.path == "/drip":   # a byte every 0.2 s: each read is quick, the whole fetch is not
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for _ in range(50):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except (BrokenPipeError, ConnectionResetError):
                pass
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


@pytest.fixture(scope="module")
def http_base():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def read(url, policy):
    return asyncio.run(read_image_url(url, policy))


def fails(url, policy, status, message):
    with pytest.raises(APIError) as e:
        read(url, policy)
    assert e.value.status == status and message in e.value.message, e.value.message
    assert e.value.body()["error"]["param"] == "image_url"


def test_http_fetch_when_enabled(http_base):
    on = ImagePolicy.create(max_bytes=16 * 1024, allow_http=True, http_timeout_s=1.0)
    assert read(http_base + "/ok.png", on) == PNG
    fails(http_base + "/declared-big", on, 413, "larger than 16384")
    fails(http_base + "/undeclared-big", on, 413, "larger than 16384")
    fails(http_base + "/missing.png", on, 400, "HTTP 404")
    start = time.perf_counter()
    fails(http_base + "/drip", on, 400, "timed out after 1.0 s")
    assert time.perf_counter() - start < 3
    fails("http://127.0.0.1:9/refused.png", on, 400, "cannot fetch")


def test_http_fetch_is_off_by_default(http_base):
    fails(http_base + "/ok.png", ImagePolicy(), 400, "disabled")


def test_data_and_file_urls(tmp_path):
    policy = ImagePolicy.create(max_bytes=4096, allowed_file_dirs=[tmp_path])
    assert read("data:image/png;base64," + base64.b64encode(PNG).decode(), policy) == PNG
    fails("data:image/png," + "x", policy, 400, "base64-encoded")
    fails("data:image/png;base64,@@", policy, 400, "not valid base64")
    fails("data:image/png;base64," + "A" * 8000, policy, 413, "larger than 4096")
    (tmp_path / "a.png").write_bytes(PNG)
    assert read(f"file://{tmp_path}/a.png", policy) == PNG
    fails(f"file://{tmp_path}/../a.png", policy, 400, "only allowed under")
    fails(f"file://{tmp_path}/b.png", policy, 400, "does not exist")
    (tmp_path / "big.png").write_bytes(b"x" * 5000)
    fails(f"file://{tmp_path}/big.png", policy, 413, "larger than")
    fails("ftp://host/a.png", policy, 400, "must be a data: URL")
