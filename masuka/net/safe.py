"""SSRF protection for URL sources.

Every URL a user gives us (and every redirect hop) goes through :func:`check_url`,
which resolves the host once and refuses loopback, private, link-local, multicast,
reserved, unspecified and cloud-metadata addresses (unless private addresses were
explicitly allowed). The connection is then made to exactly the address that was
checked (:class:`PinnedTransport`), keeping the original ``Host`` header and TLS
SNI/certificate hostname, so a second DNS answer (DNS rebinding) cannot redirect it.

:func:`open_stream` ties it together: a streaming GET that follows redirects by
hand (at most ``max_redirects``), re-checking every hop and dropping credentials
when the origin changes.

Nothing happens at import time. Environment proxies are deliberately not used
(a proxy would make the address check meaningless).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import httpx

logger = logging.getLogger(__name__)

ALLOW_PRIVATE_ENV = "MASUKA_ALLOW_PRIVATE_URLS"
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 60.0
MAX_REDIRECTS = 5
ALLOWED_SCHEMES = ("http", "https")
DEFAULT_USER_AGENT = "masuka-downloader/1.0"

# Cloud metadata endpoints: refused even when private addresses are allowed.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS / GCP / Azure / OpenStack / ...
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS IPv6 IMDS
        "100.100.100.200",  # Alibaba Cloud
    )
)

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Headers that carry credentials: never forwarded to another origin.
_CREDENTIAL_HEADERS = ("authorization", "proxy-authorization", "cookie")
_SENSITIVE_QUERY_MARKERS = (
    "token",
    "key",
    "sig",
    "auth",
    "pass",
    "secret",
    "credential",
    "session",
    "x-amz-",
    "x-goog-",
)

Timeout = float | tuple[float, float] | httpx.Timeout | None


class URLRefusedError(ValueError):
    """A URL refused by policy (scheme, address, malformed). A ``ValueError``."""


class NetworkError(RuntimeError):
    """A transfer failed (cannot resolve/connect, timeout, protocol error, too many redirects)."""


@dataclass(frozen=True)
class ResolvedURL:
    """A URL whose host was resolved and checked.

    ``ip`` is the address the connection must go to; ``addresses`` are all the
    (checked) addresses the host resolved to, ``ip`` first.
    """

    url: str
    scheme: str
    host: str  # ASCII host (IDNA-encoded), IPv6 without brackets
    port: int
    ip: str
    addresses: tuple[str, ...]


@dataclass
class SafeResponse:
    """A streaming response from :func:`open_stream`; ``url`` is the final URL after redirects."""

    response: httpx.Response
    url: str
    redirects: tuple[str, ...]

    @property
    def status_code(self) -> int:
        return self.response.status_code

    @property
    def headers(self) -> httpx.Headers:
        return self.response.headers


def redact_url(url: object) -> str:
    """The URL for messages/logs: no userinfo, sensitive query values replaced by ``***``."""
    text = str(url)
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        redacted = []
        for key, value in pairs:
            low = key.lower()
            if any(marker in low for marker in _SENSITIVE_QUERY_MARKERS):
                value = "***"
            redacted.append((key, value))
        query = urllib.parse.urlencode(redacted, safe="*")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _as_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """IPv4 address carried inside an IPv6 one (mapped, 6to4, Teredo, IPv4-compatible, NAT64)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    packed = ip.packed
    if packed[:12] == bytes(12) and packed[12:] not in (bytes(4), b"\x00\x00\x00\x01"):
        return ipaddress.IPv4Address(packed[12:])  # deprecated IPv4-compatible ::a.b.c.d
    if ip in ipaddress.IPv6Network("64:ff9b::/96"):
        return ipaddress.IPv4Address(packed[12:])  # NAT64
    return None


def blocked_reason(address: str, *, allow_private: bool = False) -> str | None:
    """Why connecting to ``address`` is refused, or None when it is allowed."""
    ip = _as_ip(address)
    if ip is None:
        return "not an IP address"
    if ip in METADATA_ADDRESSES:
        return "cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            reason = blocked_reason(str(inner), allow_private=allow_private)
            if reason is not None:
                return f"{reason} (embedded in IPv6 {ip})"
    if allow_private:
        return None
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("site-local", isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local),
        ("not globally routable", not ip.is_global),
    )
    for reason, hit in checks:
        if hit:
            return f"{reason} address"
    return None


class _RedactURLFilter(logging.Filter):
    """Redacts URLs in httpx's own request log lines (they may carry tokens in the query string)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(isinstance(a, httpx.URL) for a in args):
            record.args = tuple(redact_url(a) if isinstance(a, httpx.URL) else a for a in args)
        return True


_redact_filter = _RedactURLFilter()


def _install_log_redaction() -> None:
    httpx_logger = logging.getLogger("httpx")
    if _redact_filter not in httpx_logger.filters:
        httpx_logger.addFilter(_redact_filter)


def _parse(url: str) -> httpx.URL:
    if not isinstance(url, str) or not url.strip():
        raise URLRefusedError(f"empty or non-string URL: {url!r}")
    try:
        parsed = httpx.URL(url.strip())
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise URLRefusedError(f"malformed URL {redact_url(url)!r}: {exc}") from exc
    return parsed


def check_url(url: str, *, allow_private: bool) -> ResolvedURL:
    """Check ``url`` and resolve its host once.

    Raises :class:`URLRefusedError` (a ``ValueError``) when the scheme is not
    http/https, the host is missing or cannot be resolved, or ANY resolved address
    is loopback, private, link-local, multicast, reserved, unspecified or not
    globally routable (unless ``allow_private``), or a cloud metadata address
    (always). Returns the checked address to connect to.
    """
    parsed = _parse(url)
    scheme = parsed.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise URLRefusedError(
            f"URL scheme {scheme or '(none)'!r} is not allowed for {redact_url(url)!r}; only http and https are"
        )
    try:
        host = parsed.raw_host.decode("ascii")
    except UnicodeDecodeError as exc:
        raise URLRefusedError(f"malformed host in URL {redact_url(url)!r}") from exc
    host = host.strip("[]").rstrip(".").lower() if host else host
    if not host:
        raise URLRefusedError(f"URL {redact_url(url)!r} has no host")
    port = parsed.port or (443 if scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise URLRefusedError(f"cannot resolve host {host!r} of {redact_url(url)!r}: {exc}") from exc
    addresses: list[str] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise URLRefusedError(f"host {host!r} of {redact_url(url)!r} resolved to no IP address")
    for address in addresses:
        reason = blocked_reason(address, allow_private=allow_private)
        if reason is not None:
            # The switch only helps where it would let this address through (never a metadata address).
            helps = not allow_private and blocked_reason(address, allow_private=True) is None
            hint = f" (set {ALLOW_PRIVATE_ENV}=1 to allow private addresses)" if helps else ""
            raise URLRefusedError(
                f"refusing {redact_url(url)!r}: host {host!r} resolves to {address} ({reason}){hint}"
            )
    logger.debug("checked %s: %s -> %s", redact_url(url), host, ", ".join(addresses))
    return ResolvedURL(
        url=str(parsed), scheme=scheme, host=host, port=port, ip=addresses[0], addresses=tuple(addresses)
    )


def make_timeout(timeout: Timeout = None) -> httpx.Timeout:
    """``None`` → defaults (10 s connect, 60 s read); a float → both; ``(connect, read)``; or an ``httpx.Timeout``."""
    if timeout is None:
        return httpx.Timeout(DEFAULT_READ_TIMEOUT, connect=DEFAULT_CONNECT_TIMEOUT, pool=DEFAULT_CONNECT_TIMEOUT)
    if isinstance(timeout, httpx.Timeout):
        return timeout
    if isinstance(timeout, tuple):
        if len(timeout) != 2:
            raise ValueError(f"timeout tuple must be (connect, read), got {timeout!r}")
        connect, read = (float(t) for t in timeout)
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        connect = read = float(timeout)
    else:
        raise ValueError(f"invalid timeout {timeout!r}")
    if connect <= 0 or read <= 0:
        raise ValueError(f"timeouts must be positive, got {timeout!r}")
    return httpx.Timeout(read, connect=connect, pool=connect)


def _url_host(ip: str) -> str:
    return ip.split("%", 1)[0]


class PinnedTransport(httpx.HTTPTransport):
    """An httpx transport that connects only to the checked addresses of one host.

    The request URL keeps the original hostname (so the ``Host`` header is
    unchanged), while the TCP connection goes to ``resolved.ip`` (falling back to
    the other checked addresses if that one cannot be reached) and TLS uses the
    original hostname for SNI and certificate verification. No DNS lookup happens.
    """

    def __init__(self, resolved: ResolvedURL, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.resolved = resolved
        self.connected_ips: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.raw_host.decode("ascii").strip("[]").rstrip(".").lower()
        port = request.url.port or (443 if request.url.scheme == "https" else 80)
        if host != self.resolved.host or port != self.resolved.port:
            raise NetworkError(
                f"transport pinned to {self.resolved.host}:{self.resolved.port} refused a request to {host}:{port}"
            )
        original_url = request.url
        extensions = dict(request.extensions)
        if original_url.scheme == "https":
            extensions["sni_hostname"] = self.resolved.host
        last_error: httpx.ConnectError | None = None
        for ip in self.resolved.addresses:
            request.url = original_url.copy_with(host=_url_host(ip))
            request.extensions = extensions
            try:
                self.connected_ips.append(ip)
                return super().handle_request(request)
            except httpx.ConnectError as exc:
                logger.debug("connect to %s (%s) failed: %s", self.resolved.host, ip, exc)
                last_error = exc
            finally:
                request.url = original_url
        assert last_error is not None
        raise last_error


def _origin(url: httpx.URL) -> tuple[str, bytes, int | None]:
    return (url.scheme, url.raw_host.lower(), url.port)


def _describe(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return "connection timed out"
    if isinstance(exc, httpx.ReadTimeout):
        return "read timed out (server stopped sending)"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect: {exc}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"connection closed or protocol error: {exc}"
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def open_stream(
    url: str,
    *,
    allow_private: bool,
    headers: Mapping[str, str] | None = None,
    timeout: Timeout = None,
    max_redirects: int = MAX_REDIRECTS,
    method: str = "GET",
) -> Iterator[SafeResponse]:
    """Open a streaming GET/HEAD to ``url`` safely; yields a :class:`SafeResponse` (body not yet read).

    Redirects (301/302/303/307/308) are followed by hand, at most ``max_redirects``;
    each hop's URL goes through :func:`check_url` and is connected through a
    :class:`PinnedTransport`. Credentials (Authorization, Cookie) are dropped when
    a redirect changes origin. The final response is yielded whatever its status
    (the caller checks it). Transport failures (also while the caller reads the
    body inside the ``with`` block) raise :class:`NetworkError`; refused URLs
    raise :class:`URLRefusedError`.
    """
    method = method.upper()
    if method not in ("GET", "HEAD"):
        raise ValueError(f"only GET and HEAD are supported, not {method!r}")
    httpx_timeout = make_timeout(timeout)
    _install_log_redaction()
    send_headers = httpx.Headers({"User-Agent": DEFAULT_USER_AGENT})
    if headers:
        send_headers.update(headers)
    current = url
    hops: list[str] = []
    for _hop in range(max_redirects + 1):
        resolved = check_url(current, allow_private=allow_private)
        transport = PinnedTransport(resolved)
        client = httpx.Client(transport=transport, timeout=httpx_timeout, follow_redirects=False, trust_env=False)
        response: httpx.Response | None = None
        try:
            logger.debug("%s %s (connecting to %s)", method, redact_url(resolved.url), resolved.ip)
            try:
                request = client.build_request(method, resolved.url, headers=send_headers)
                response = client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise NetworkError(f"request to {redact_url(resolved.url)} failed: {_describe(exc)}") from exc
            location = response.headers.get("location")
            if response.status_code in _REDIRECT_STATUSES and location:
                try:
                    next_url = httpx.URL(resolved.url).join(location)
                except (httpx.InvalidURL, ValueError) as exc:
                    raise NetworkError(
                        f"{redact_url(resolved.url)} redirected to a malformed location: {exc}"
                    ) from exc
                if _origin(next_url) != _origin(httpx.URL(resolved.url)):
                    for name in _CREDENTIAL_HEADERS:
                        send_headers.pop(name, None)
                logger.debug("redirect %d: %s -> %s", response.status_code, redact_url(resolved.url),
                             redact_url(next_url))
                hops.append(resolved.url)
                current = str(next_url)
                continue
            try:
                yield SafeResponse(response=response, url=resolved.url, redirects=tuple(hops))
            except httpx.HTTPError as exc:
                raise NetworkError(f"transfer from {redact_url(resolved.url)} failed: {_describe(exc)}") from exc
            return
        finally:
            if response is not None:
                response.close()
            client.close()
    raise NetworkError(f"too many redirects (more than {max_redirects}) starting from {redact_url(url)}")
