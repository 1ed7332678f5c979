"""SSRF protection: scheme/address checks, checked redirects, pinned connections (DNS rebinding).

No traffic ever leaves loopback: an autouse fixture makes any connection to a
non-loopback address fail the test, and hostnames are resolved by a fake resolver.
"""

from __future__ import annotations

import http.server
import logging
import socket
import threading
from collections.abc import Callable

import httpx
import pytest

from masuka.net import safe as netsafe
from masuka.net.safe import NetworkError, URLRefusedError, check_url, open_stream

pytestmark = pytest.mark.timeout(60)

_REAL_GETADDRINFO = socket.getaddrinfo
_REAL_CREATE_CONNECTION = socket.create_connection


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def connections(monkeypatch) -> list[tuple[str, int]]:
    """Record every TCP connection; any non-loopback destination fails the test."""
    made: list[tuple[str, int]] = []

    def guarded(address, *args, **kwargs):
        host, port = address[0], address[1]
        made.append((host, port))
        if host not in ("127.0.0.1", "::1"):
            raise AssertionError(f"test tried to connect to non-loopback address {host}:{port}")
        return _REAL_CREATE_CONNECTION(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
    return made


class FakeDNS:
    """Resolves the given hostnames (a list of answers, or a callable per call); others go to the real resolver."""

    def __init__(self, answers: dict[str, list[str] | Callable[[int], list[str]]]):
        self.answers = answers
        self.calls: list[str] = []

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        key = host.decode() if isinstance(host, bytes) else host
        if key in self.answers:
            self.calls.append(key)
            answer = self.answers[key]
            ips = answer(self.calls.count(key)) if callable(answer) else answer
            out = []
            for ip in ips:
                if ":" in ip:
                    out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port or 0, 0, 0)))
                else:
                    out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port or 0)))
            return out
        if key.endswith(".example"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return _REAL_GETADDRINFO(host, port, family, type, proto, flags)


@pytest.fixture
def fake_dns(monkeypatch):
    def install(answers):
        dns = FakeDNS(answers)
        monkeypatch.setattr(socket, "getaddrinfo", dns)
        return dns

    return install


class Server:
    """A loopback HTTP server; ``routes`` maps a path to a handler function(handler)."""

    def __init__(self, routes: dict[str, Callable[[http.server.BaseHTTPRequestHandler], None]]):
        self.requests: list[tuple[str, dict[str, str]]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                server.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    send(self, 404, b"not found")
                else:
                    route(self)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def send(handler, status: int, body: bytes = b"", headers: dict[str, str] | None = None):
    handler.send_response(status)
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.wfile.write(body)
    handler.close_connection = True


def redirect(location: str):
    return lambda h: send(h, 302, b"", {"Location": location})


@pytest.fixture
def serve():
    servers: list[Server] = []

    def start(routes):
        srv = Server(routes)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.close()


def allow_only_first(monkeypatch, first_url: str) -> list[str]:
    """Patch check_url so that exactly ``first_url`` is checked with allow_private=True; every other URL normally."""
    real = netsafe.check_url
    checked: list[str] = []

    def patched(url, *, allow_private):
        checked.append(url)
        if url == first_url and len(checked) == 1:
            return real(url, allow_private=True)
        return real(url, allow_private=allow_private)

    monkeypatch.setattr(netsafe, "check_url", patched)
    return checked


# --------------------------------------------------------------------------- check_url


@pytest.mark.parametrize(
    "url, scheme",
    [
        ("file:///etc/passwd", "file"),
        ("ftp://example.com/lora.safetensors", "ftp"),
        ("gopher://example.com:70/_GET", "gopher"),
        ("javascript:alert(1)", "javascript"),
        ("data:text/plain,hello", "data"),
    ],
)
def test_non_http_schemes_refused(url, scheme, monkeypatch):
    def no_dns(*args, **kwargs):
        raise AssertionError("no resolution for a refused scheme")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    for allow_private in (False, True):
        with pytest.raises(URLRefusedError, match=f"scheme '{scheme}'") as info:
            check_url(url, allow_private=allow_private)
        assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("url", ["", "   ", "http://", "http:///path", "not a url"])
def test_malformed_urls_refused(url):
    with pytest.raises(ValueError):
        check_url(url, allow_private=False)


PRIVATE_LITERALS = [
    "http://127.0.0.1/",
    "http://127.1.2.3:8080/x",
    "http://localhost/",
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:10.0.0.1]/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://100.64.1.1/",
    "http://100.100.100.200/",
    "http://224.0.0.1/",
    "http://240.0.0.1/",
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://[fd00:ec2::254]/",
    "http://[2002:7f00:1::]/",  # 6to4 of 127.0.0.1
    "http://[64:ff9b::a00:1]/",  # NAT64 of 10.0.0.1
]


@pytest.mark.parametrize("url", PRIVATE_LITERALS)
def test_private_addresses_refused_without_allow_private(url):
    with pytest.raises(URLRefusedError, match="refusing") as info:
        check_url(url, allow_private=False)
    assert "address" in str(info.value)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1/", "http://localhost:8080/", "http://10.0.0.1/", "http://192.168.1.1/", "http://[::1]/",
     "http://0.0.0.0/", "https://[::ffff:192.168.0.2]/"],
)
def test_private_addresses_allowed_with_allow_private(url):
    resolved = check_url(url, allow_private=True)
    assert resolved.ip in resolved.addresses


@pytest.mark.parametrize(
    "url",
    ["http://169.254.169.254/", "http://[fd00:ec2::254]/", "http://100.100.100.200/", "http://[::ffff:169.254.169.254]/"],
)
def test_metadata_addresses_always_refused(url):
    with pytest.raises(URLRefusedError, match="metadata"):
        check_url(url, allow_private=True)


@pytest.mark.parametrize(
    "url, suggested",
    [
        ("http://10.0.0.1/", True),
        ("http://[::1]/", True),
        ("http://[::ffff:192.168.0.2]/", True),
        ("http://169.254.169.254/", False),  # metadata: refused even with the switch, so never suggested
        ("http://100.100.100.200/", False),
        ("http://[fd00:ec2::254]/", False),
        ("http://[::ffff:169.254.169.254]/", False),
    ],
)
@pytest.mark.parametrize("allow_private", [False, True])
def test_private_url_switch_is_suggested_only_where_it_would_help(url, suggested, allow_private):
    if allow_private and suggested:
        check_url(url, allow_private=True)
        return
    with pytest.raises(URLRefusedError) as info:
        check_url(url, allow_private=allow_private)
    assert ("MASUKA_ALLOW_PRIVATE_URLS" in str(info.value)) == (suggested and not allow_private), str(info.value)


@pytest.mark.parametrize(
    "host, answer",
    [
        ("evil.example", ["10.0.0.5"]),
        ("mixed.example", ["93.184.215.14", "10.0.0.5"]),  # ANY bad address refuses
        ("mapped.example", ["::ffff:10.0.0.1"]),
        ("loop6.example", ["::1"]),
        ("meta.example", ["169.254.169.254"]),
        ("cgnat.example", ["100.64.0.9"]),
    ],
)
def test_hostnames_resolving_to_private_refused(fake_dns, host, answer):
    dns = fake_dns({host: answer})
    with pytest.raises(URLRefusedError) as info:
        check_url(f"https://{host}/lora.safetensors", allow_private=False)
    assert host in str(info.value)
    assert dns.calls == [host]


def test_public_hostname_allowed_without_connecting(fake_dns, connections):
    dns = fake_dns({"good.example": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]})
    resolved = check_url("https://good.example/api/download/models/123?type=Model", allow_private=False)
    assert resolved.ip == "93.184.215.14"
    assert resolved.addresses == ("93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c")
    assert resolved.host == "good.example" and resolved.port == 443 and resolved.scheme == "https"
    assert dns.calls == ["good.example"]
    assert connections == []


def test_unresolvable_host_refused(fake_dns):
    fake_dns({})
    with pytest.raises(URLRefusedError, match="cannot resolve host 'nowhere.example'"):
        check_url("http://nowhere.example/", allow_private=False)


def test_redact_url_hides_credentials():
    red = netsafe.redact_url("https://user:pw@civitai.com/api/download/models/1?token=SECRET&type=Model&X-Amz-Signature=S")
    assert "SECRET" not in red and "pw" not in red and "=S" not in red
    assert "type=Model" in red and "civitai.com/api/download/models/1" in red


def test_timeouts():
    t = netsafe.make_timeout(None)
    assert t.connect == 10.0 and t.read == 60.0
    t = netsafe.make_timeout((2, 5))
    assert t.connect == 2 and t.read == 5
    with pytest.raises(ValueError):
        netsafe.make_timeout(-1)


# --------------------------------------------------------------------------- open_stream / redirects


def test_stream_fetches_local_file_with_allow_private(serve):
    srv = serve({"/f": lambda h: send(h, 200, b"hello")})
    with open_stream(srv.url("/f"), allow_private=True) as resp:
        assert resp.status_code == 200
        assert resp.response.read() == b"hello"
        assert resp.url == srv.url("/f")


def test_stream_refuses_loopback_without_allow_private(serve, connections):
    srv = serve({"/f": lambda h: send(h, 200, b"hello")})
    with pytest.raises(URLRefusedError, match="loopback"):
        with open_stream(srv.url("/f"), allow_private=False):
            pass
    assert srv.requests == [] and connections == []


def test_redirect_to_private_literal_refused_before_connecting(serve, monkeypatch, connections):
    srv = serve({"/start": redirect("http://10.1.2.3/secret")})
    first = srv.url("/start")
    checked = allow_only_first(monkeypatch, first)
    with pytest.raises(URLRefusedError, match="10.1.2.3"):
        with open_stream(first, allow_private=False):
            pass
    assert checked == [first, "http://10.1.2.3/secret"]
    assert [p for p, _ in srv.requests] == ["/start"]
    assert {host for host, _ in connections} == {"127.0.0.1"}


def test_redirect_to_hostname_resolving_private_refused(serve, monkeypatch, fake_dns, connections):
    dns = fake_dns({"evil.example": ["10.0.0.5"]})
    srv = serve({"/start": redirect("http://evil.example/x")})
    first = srv.url("/start")
    allow_only_first(monkeypatch, first)
    with pytest.raises(URLRefusedError, match="evil.example"):
        with open_stream(first, allow_private=False):
            pass
    assert dns.calls == ["evil.example"]
    assert {host for host, _ in connections} == {"127.0.0.1"}


def test_redirect_to_file_scheme_refused(serve):
    srv = serve({"/start": redirect("file:///etc/passwd")})
    with pytest.raises(URLRefusedError, match="scheme 'file'"):
        with open_stream(srv.url("/start"), allow_private=True):
            pass


def test_relative_redirects_followed_and_rechecked(serve, monkeypatch):
    srv = serve({"/a": redirect("/b"), "/b": redirect("c"), "/c": lambda h: send(h, 200, b"done")})
    checked: list[str] = []
    real = netsafe.check_url

    def spy(url, *, allow_private):
        checked.append(url)
        return real(url, allow_private=allow_private)

    monkeypatch.setattr(netsafe, "check_url", spy)
    with open_stream(srv.url("/a"), allow_private=True) as resp:
        assert resp.response.read() == b"done"
        assert resp.url == srv.url("/c")
        assert resp.redirects == (srv.url("/a"), srv.url("/b"))
    assert checked == [srv.url("/a"), srv.url("/b"), srv.url("/c")]


def test_too_many_redirects(serve):
    routes = {f"/r{i}": redirect(f"/r{i + 1}") for i in range(10)}
    srv = serve(routes)
    with pytest.raises(NetworkError, match="too many redirects"):
        with open_stream(srv.url("/r0"), allow_private=True, max_redirects=5):
            pass
    assert len(srv.requests) == 6


def test_credentials_dropped_on_cross_origin_redirect(serve, fake_dns):
    fake_dns({"other.example": ["127.0.0.1"]})
    target = serve({"/t": lambda h: send(h, 200, b"ok")})
    origin = serve({"/same": redirect("/go"), "/go": redirect(target.url("/t", host="other.example"))})
    headers = {"Authorization": "Bearer SECRET", "Cookie": "s=1", "X-Keep": "yes"}
    with open_stream(origin.url("/same"), allow_private=True, headers=headers) as resp:
        assert resp.response.read() == b"ok"
    assert [h.get("authorization") for _, h in origin.requests] == ["Bearer SECRET", "Bearer SECRET"]
    (_, seen), = target.requests
    assert "authorization" not in seen and "cookie" not in seen
    assert seen["x-keep"] == "yes"
    assert seen["host"] == f"other.example:{target.port}"


def test_read_timeout_raises_network_error(serve):
    stop = threading.Event()

    def stall(h):
        stop.wait(10)

    srv = serve({"/stall": stall})
    try:
        with pytest.raises(NetworkError, match="timed out"):
            with open_stream(srv.url("/stall"), allow_private=True, timeout=(2, 0.5)):
                pass
    finally:
        stop.set()


def test_httpx_log_lines_are_redacted(serve, caplog):
    caplog.set_level(logging.DEBUG)
    srv = serve({"/f": lambda h: send(h, 200, b"x")})
    with open_stream(srv.url("/f?token=TOPSECRET&a=1"), allow_private=True) as resp:
        resp.response.read()
    assert "HTTP Request" in caplog.text
    assert "TOPSECRET" not in caplog.text


# --------------------------------------------------------------------------- pinning / DNS rebinding


def test_dns_rebinding_connection_goes_to_checked_address(serve, fake_dns, connections):
    srv = serve({"/f": lambda h: send(h, 200, b"pinned")})
    # First answer (checked): loopback. Any later answer would be a private network host.
    dns = fake_dns({"rebind.example": lambda n: ["127.0.0.1"] if n == 1 else ["10.0.0.9"]})
    with open_stream(srv.url("/f", host="rebind.example"), allow_private=True) as resp:
        assert resp.response.read() == b"pinned"
    assert dns.calls == ["rebind.example"]  # resolved exactly once, by the check
    assert connections == [("127.0.0.1", srv.port)]
    (_, seen), = srv.requests
    assert seen["host"] == f"rebind.example:{srv.port}"


def test_pinned_transport_never_resolves_and_keeps_host(serve, monkeypatch, connections):
    srv = serve({"/f": lambda h: send(h, 200, b"ok")})

    def no_dns(host, *args, **kwargs):
        if host == "pinned.example":
            raise AssertionError("pinned host was resolved again")
        return _REAL_GETADDRINFO(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    resolved = netsafe.ResolvedURL(
        url=srv.url("/f", host="pinned.example"), scheme="http", host="pinned.example", port=srv.port,
        ip="127.0.0.1", addresses=("127.0.0.1",),
    )
    transport = netsafe.PinnedTransport(resolved)
    with httpx.Client(transport=transport, trust_env=False) as client:
        response = client.get(resolved.url)
        assert response.content == b"ok"
        assert str(response.request.url) == resolved.url
        with pytest.raises(NetworkError, match="pinned"):
            client.get(srv.url("/f", host="other.example"))
    assert transport.connected_ips == ["127.0.0.1"]
    assert connections == [("127.0.0.1", srv.port)]
    assert srv.requests[0][1]["host"] == f"pinned.example:{srv.port}"


def test_pinned_transport_https_sets_sni_and_keeps_timeouts(monkeypatch):
    captured: dict = {}

    def fake_handle(self, request):
        captured["url"] = str(request.url)
        captured["host_header"] = request.headers["host"]
        captured["extensions"] = dict(request.extensions)
        return httpx.Response(200, content=b"")

    monkeypatch.setattr(httpx.HTTPTransport, "handle_request", fake_handle)
    resolved = netsafe.ResolvedURL(
        url="https://cdn.example/file", scheme="https", host="cdn.example", port=443,
        ip="2606:2800:21f:cb07:6820:80da:af6b:8b2c", addresses=("2606:2800:21f:cb07:6820:80da:af6b:8b2c",),
    )
    with httpx.Client(transport=netsafe.PinnedTransport(resolved), timeout=httpx.Timeout(7, connect=3)) as client:
        client.get("https://cdn.example/file")
    assert captured["url"] == "https://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]/file"
    assert captured["host_header"] == "cdn.example"
    assert captured["extensions"]["sni_hostname"] == "cdn.example"
    assert captured["extensions"]["timeout"]["connect"] == 3


def test_pinned_transport_falls_back_to_other_checked_address(serve, connections):
    srv = serve({"/f": lambda h: send(h, 200, b"ok")})
    resolved = netsafe.ResolvedURL(
        url=srv.url("/f", host="dual.example"), scheme="http", host="dual.example", port=srv.port,
        ip="::1", addresses=("::1", "127.0.0.1"),  # nothing listens on ::1 at that port
    )
    transport = netsafe.PinnedTransport(resolved)
    with httpx.Client(transport=transport, trust_env=False) as client:
        assert client.get(resolved.url).content == b"ok"
    assert transport.connected_ips[-1] == "127.0.0.1"
    assert {host for host, _ in connections} <= {"::1", "127.0.0.1"}


@pytest.mark.parametrize(
    "address, allowed",
    [
        ("93.184.215.14", True),
        ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", True),
        ("::127.0.0.1", False),
        ("2002:0a00:0001::1", False),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),  # Teredo client 127.0.0.1
        ("192.0.2.1", False),
        ("198.18.0.1", False),
    ],
)
def test_blocked_reason_table(address, allowed):
    assert (netsafe.blocked_reason(address) is None) is allowed
