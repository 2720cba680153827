"""Image URL policy: data URLs, file:// allowlist, and http(s) fetching with a deadline, a byte cap
and destination checks (no loopback / private addresses, first request and every redirect)."""

import asyncio
import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

import httpx

from deployments.url_policy import FETCH_FAILED, ImagePolicy, check_destination, read_image_url, refused_address
from deployments.errors import APIError

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
        type(self).seen.append(self.path)
        if self.path.startswith("/redirect-to/"):   # /redirect-to/<port>/<path>
            port, _, rest = self.path[len("/redirect-to/"):].partition("/")
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{port}/{rest}")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/ok.png":
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


def serve_http():
    """A loopback HTTP server; returns (base URL, port, list of paths it was asked for, stop)."""
    handler = type("RecordingHandler", (Handler,), {"seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop():
        server.shutdown()
        server.server_close()

    port = server.server_address[1]
    return f"http://127.0.0.1:{port}", port, handler.seen, stop


@pytest.fixture(scope="module")
def http_server():
    base, port, seen, stop = serve_http()
    yield base, port, seen
    stop()


@pytest.fixture(scope="module")
def http_base(http_server):
    return http_server[0]


def loopback_allowed(port: int, **kw) -> ImagePolicy:
    """Fetching on, with the test server's loopback address admitted by the host allowlist."""
    return ImagePolicy.create(max_bytes=16 * 1024, allow_http=True, http_timeout_s=1.0,
                              allowed_hosts=[f"127.0.0.1:{port}"], **kw)


def read(url, policy):
    return asyncio.run(read_image_url(url, policy))


def fails(url, policy, status, message):
    with pytest.raises(APIError) as e:
        read(url, policy)
    assert e.value.status == status and message in e.value.message, e.value.message
    assert e.value.body()["error"]["param"] == "image_url"


def test_http_fetch_when_enabled(http_server):
    base, port, _ = http_server
    on = loopback_allowed(port)
    assert read(base + "/ok.png", on) == PNG
    assert read(f"http://localhost:{port}/ok.png", ImagePolicy.create(
        16 * 1024, allow_http=True, allowed_hosts=[f"localhost:{port}"])) == PNG
    fails(base + "/declared-big", on, 413, "larger than 16384")
    fails(base + "/undeclared-big", on, 413, "larger than 16384")
    start = time.perf_counter()
    fails(base + "/drip", on, 400, FETCH_FAILED)
    assert time.perf_counter() - start < 3


def test_failed_fetches_do_not_echo_the_remote_answer(http_server):
    base, port, _ = http_server
    on = ImagePolicy.create(16 * 1024, allow_http=True, allowed_hosts=["127.0.0.1"])
    for url in (base + "/missing.png", "http://127.0.0.1:9/refused.png"):
        with pytest.raises(APIError) as e:
            read(url, on)
        assert (e.value.status, e.value.message) == (400, FETCH_FAILED)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "[::1]", "127.1.2.3"])
def test_loopback_destinations_are_refused_before_connecting(host):
    base, port, seen, stop = serve_http()
    try:
        on = ImagePolicy.create(16 * 1024, allow_http=True, http_timeout_s=1.0)
        fails(f"http://{host}:{port}/ok.png", on, 400, "non-public address")
        assert seen == []
    finally:
        stop()


def test_a_redirect_to_loopback_is_refused_and_never_followed():
    base_a, port_a, seen_a, stop_a = serve_http()
    base_b, port_b, seen_b, stop_b = serve_http()
    try:
        fails(f"{base_a}/redirect-to/{port_b}/ok.png", loopback_allowed(port_a), 400, "non-public address")
        assert seen_a == [f"/redirect-to/{port_b}/ok.png"] and seen_b == []
        # both admitted: the redirect is followed
        both = ImagePolicy.create(16 * 1024, allow_http=True, allowed_hosts=[f"127.0.0.1:{port_a}",
                                                                            f"127.0.0.1:{port_b}"])
        assert read(f"{base_a}/redirect-to/{port_b}/ok.png", both) == PNG and seen_b == ["/ok.png"]
    finally:
        stop_a()
        stop_b()


@pytest.mark.parametrize("url", ["http://10.1.2.3/a.png", "http://192.168.0.7/a.png", "http://172.16.5.4/a.png",
                                 "http://169.254.169.254/latest/meta-data", "http://100.64.0.1/a.png",
                                 "http://0.0.0.0/a.png", "http://224.0.0.1/a.png", "http://240.0.0.1/a.png",
                                 "http://[fe80::1]/a.png", "http://[fc00::1]/a.png", "http://[2002:a01:203::1]/a.png",
                                 "http://[::ffff:10.0.0.1]/a.png", "https://10.0.0.1:8443/a.png"])
def test_private_and_reserved_destinations_are_refused_without_traffic(url):
    sent = []
    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(200)))
    on = ImagePolicy.create(16 * 1024, allow_http=True)
    with pytest.raises(APIError) as e:
        asyncio.run(read_image_url(url, on, client))
    assert e.value.status == 400 and "non-public address" in e.value.message
    assert sent == []


def test_public_addresses_pass_and_the_checked_address_is_what_gets_connected():
    import ipaddress

    assert not refused_address(ipaddress.ip_address("93.184.215.14"))
    assert not refused_address(ipaddress.ip_address("2606:2800:21f:cb07:6820:80da:af6b:8b2c"))
    dest = asyncio.run(check_destination("https://93.184.215.14:8443/x.png?q=1", ImagePolicy(allow_http=True)))
    assert (dest.url, dest.host, dest.host_header) == ("https://93.184.215.14:8443/x.png?q=1", "93.184.215.14",
                                                       "93.184.215.14:8443")


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
