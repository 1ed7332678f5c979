"""Guards in front of Gradio: one pure ASGI middleware that sees every request first.

Gradio's app is built by `demo.launch`; `masuka.web.server.launch` hands this
middleware to it through `app_kwargs={"middleware": [...]}`, so it runs before any
Gradio route (only Gradio's own CORS and compression wrappers sit outside it).

- Host and Origin: only the names the app is served under answer (DNS rebinding,
  cross-site reads and writes).
- Logins (`POST /login`): failures slow down, then lock out, per client address and
  per user name (`LoginGuard`, also for the REST API's basic auth).
- With a password, every `/gradio_api/` route needs a login, including the ones
  Gradio leaves open (cancel, heartbeat, stream); `/logout` ends only the caller's
  session unless `all_session=true` is asked for; the login page carries no API schema.
- Uploads (`POST /gradio_api/upload`): files per request, a lower size cap for files
  that are not LoRAs, and a quota on the upload folder.

The Gradio internals this relies on (`App.tokens`, `App.cookie_id`, the login route's
400 on a wrong password, the upload parser's cleanup on a parse error, the page's
`window.gradio_api_info` script) are each pinned by a test in tests/test_guards.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import Headers, MutableHeaders
from starlette.formparsers import MultiPartException
from starlette.middleware import Middleware
from starlette.requests import Request, cookie_parser

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MiB = 1024**2
API_PREFIX = "/gradio_api"
# What the login page itself needs before anyone has logged in.
PUBLIC_API_PATHS = frozenset(
    f"{API_PREFIX}/{name}" for name in ("login_check", "app_id", "startup-events", "user", "token", "theme.css")
)
LOGIN_PATHS = frozenset(("/login", "/login/"))
LOGOUT_PATHS = frozenset(("/logout", "/logout/"))
UPLOAD_PATHS = frozenset((f"{API_PREFIX}/upload", f"{API_PREFIX}/upload/"))
LOGIN_BODY_MAX = 64 * 1024
LORA_SUFFIX = ".safetensors"
FIELD_MAX_BYTES = 64 * 1024  # a form field that is not a file (held in memory by Gradio's parser)
CACHE_SWEEP_MAX_S = 900  # Gradio's cache sweep runs at least this often
_API_INFO_SCRIPT = re.compile(rb"<script>window\.gradio_api_info = .*?;</script>", re.DOTALL)
_EMPTY_API_INFO = b'<script>window.gradio_api_info = {"named_endpoints": {}, "unnamed_endpoints": {}};</script>'
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")


def cache_expiry(expiry_s: int) -> tuple[int, int]:
    """`gr.Blocks(delete_cache=...)` for an upload lifetime: (sweep every, delete older than) seconds."""
    if expiry_s < 1:
        raise ValueError(f"upload expiry {expiry_s} s must be at least 1 s")
    return max(1, min(CACHE_SWEEP_MAX_S, expiry_s // 4)), expiry_s


# --------------------------------------------------------------------------- Host and Origin


def host_name(value: str | None) -> str | None:
    """The name in a Host header or an Origin's host (lowercase, no port, no brackets), or None if malformed."""
    if not value:
        return None
    value = value.strip().lower()
    if value.startswith("["):
        inside, sep, rest = value[1:].partition("]")
        if not sep or (rest and not re.fullmatch(r":\d{1,5}", rest)):
            return None
        return inside if _ip(inside) is not None else None
    if value.count(":") > 1:  # a bare IPv6 address (no port possible)
        return value if _ip(value) is not None else None
    name, _, port = value.partition(":")
    if port and not port.isdigit():
        return None
    name = name[:-1] if name.endswith(".") else name
    return name if _HOST_NAME.fullmatch(name) else None


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def origin_host(origin: str) -> str | None:
    """The host name an Origin header names, or None ("null", malformed)."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or "@" in parts.netloc:
        return None
    return host_name(parts.netloc)


@dataclass(frozen=True)
class HostPolicy:
    """The names this app answers to.

    Always: loopback names and addresses (`localhost`, `*.localhost`, 127.0.0.0/8, ::1).
    Listening on all interfaces (`--host 0.0.0.0` or `::`): any IP address literal too
    (a DNS-rebinding page can only send a name, never an address it does not own).
    Listening on one address or name: that one.  A share link: its host, once open.
    Plus `--allowed-hosts` entries: exact names, `*.example.com` for subdomains, or `*`
    (no check at all).
    """

    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    any_ip: bool = False
    any_host: bool = False
    share_url: Callable[[], str | None] | None = None

    @classmethod
    def build(
        cls, listen: str, allowed: Iterable[str] = (), share_url: Callable[[], str | None] | None = None
    ) -> "HostPolicy":
        names = {"localhost"}
        suffixes = [".localhost"]
        any_ip = any_host = False
        listen = (listen or "").strip().lower().strip("[]")
        if listen in ("", "0.0.0.0", "::"):
            any_ip = True
        else:
            names.add(listen)
        for entry in allowed:
            entry = entry.strip().lower()
            if entry == "*":
                any_host = True
            elif entry.startswith("*."):
                suffixes.append(entry[1:])
            elif entry:
                names.add(entry.strip("[]"))
        return cls(frozenset(names), tuple(suffixes), any_ip, any_host, share_url)

    def allows(self, name: str | None) -> bool:
        if self.any_host:
            return True
        if name is None:
            return False
        address = _ip(name)
        if address is not None:
            return self.any_ip or address.is_loopback or name in self.names or str(address) in self.names
        if name in self.names or any(name.endswith(s) for s in self.suffixes):
            return True
        share = self.share_url() if self.share_url is not None else None
        return bool(share) and urlsplit(share).hostname == name


# --------------------------------------------------------------------------- logins


class LoginLocked(Exception):
    """Too many failed logins for this address or user name; `retry_after_s` says when to come back."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class LoginPolicy:
    free_failures: int = 5  # failures in the window before each try waits
    lockout_failures: int = 20  # failures in the window that lock the key out
    window_s: float = 15 * 60
    lockout_s: float = 15 * 60
    first_delay_s: float = 1.0  # the wait after `free_failures`, doubling per failure
    max_delay_s: float = 16.0
    known_s: float = 24 * 3600  # an address that logged in is not held by a user-name lockout this long


@dataclass
class _Record:
    failures: deque = field(default_factory=deque)
    pending: int = 0
    locked_until: float = 0.0
    known_until: float = 0.0  # address records: the last success, plus `known_s`


class LoginGuard:
    """Failed logins per client address and per user name: a growing wait, then a lockout.

    For every way in that checks a password (the page's `POST /login`, the REST API's
    basic auth)::

        delay = guard.check(address, user)   # LoginLocked (answer 429, Retry-After) or seconds to wait
        await asyncio.sleep(delay)           # before looking at the password
        ok = password_matches(...)
        guard.succeeded(address, user) if ok else guard.failed(address, user)

    Every `check` must be followed by exactly one `succeeded` or `failed`.  A try in
    flight counts as a failure until it ends, so parallel guesses cannot outrun the
    lockout.  A success clears the address's failures, not the user name's (an
    attacker's guesses at the shared login stay counted), and lets that address past
    a user-name lockout for a day: an attack on the shared login name keeps out new
    addresses, not the friends who logged in before.  Thread-safe.
    """

    def __init__(
        self, policy: LoginPolicy = LoginPolicy(), *, clock: Callable[[], float] = time.monotonic, max_keys: int = 10_000
    ):
        self.policy = policy
        self._clock = clock
        self._max_keys = max_keys
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._lock = threading.Lock()

    def _keys(self, address: str | None, user: str | None, now: float) -> list[str]:
        """The address's key, and the user name's unless this address logged in lately."""
        keys = [f"address {address or 'unknown'}"]
        known = self._records.get(keys[0])
        if user and (known is None or known.known_until <= now):
            keys.append(f"user {user[:256]!r}")
        return keys

    def _end_try(self, address: str | None, user: str | None, now: float) -> list[tuple[str, _Record]]:
        """Take the try `check` counted off both keys (whether or not the address became
        known meanwhile: a count left behind would never leave); the keys it now counts on."""
        for key in (f"address {address or 'unknown'}", f"user {(user or '')[:256]!r}"):
            record = self._records.get(key)
            if record is not None:
                record.pending = max(0, record.pending - 1)
        return [(key, self._record(key, now)) for key in self._keys(address, user, now)]

    def _record(self, key: str, now: float) -> _Record:
        record = self._records.get(key)
        if record is None:
            record = self._records[key] = _Record()
            self._evict()
        else:
            self._records.move_to_end(key)
        while record.failures and record.failures[0] <= now - self.policy.window_s:
            record.failures.popleft()
        return record

    def _evict(self) -> None:
        """Forget the oldest idle keys beyond `max_keys` (a flood of made-up user names)."""
        now = self._clock()
        for key in list(self._records):
            if len(self._records) <= self._max_keys:
                return
            record = self._records[key]
            if record.pending == 0 and record.locked_until <= now:
                del self._records[key]

    def check(self, address: str | None, user: str | None) -> float:
        """Refuse (LoginLocked) or count a try in flight and return the seconds to wait before it."""
        p = self.policy
        with self._lock:
            now = self._clock()
            records = [(key, self._record(key, now)) for key in self._keys(address, user, now)]
            for key, record in records:
                if record.locked_until > now:
                    wait = record.locked_until - now
                    raise LoginLocked(f"too many failed logins; try again in {math.ceil(wait)} s", wait)
            tries = max(len(r.failures) + r.pending for _key, r in records)
            if tries >= p.lockout_failures:  # guesses in flight would pass the lockout
                raise LoginLocked(f"too many logins at once; try again in {math.ceil(p.max_delay_s)} s", p.max_delay_s)
            for _key, record in records:
                record.pending += 1
        if tries < p.free_failures:
            return 0.0
        return min(p.max_delay_s, p.first_delay_s * 2 ** (tries - p.free_failures))

    def failed(self, address: str | None, user: str | None) -> None:
        """The try that `check` counted had a wrong password (or never finished)."""
        p = self.policy
        with self._lock:
            now = self._clock()
            for key, record in self._end_try(address, user, now):
                record.failures.append(now)
                if len(record.failures) >= p.lockout_failures and record.locked_until <= now:
                    record.locked_until = now + p.lockout_s
                    log.warning(
                        "login lockout: %s after %d failed logins in %d min; new logins refused for %d min",
                        key, len(record.failures), p.window_s // 60, p.lockout_s // 60,
                    )

    def succeeded(self, address: str | None, user: str | None) -> None:
        """The try that `check` counted had the right password: the address starts afresh."""
        with self._lock:
            now = self._clock()
            for key, record in self._end_try(address, user, now):
                if key.startswith("address "):
                    record.failures.clear()
                    record.known_until = now + self.policy.known_s


def client_address(scope: Scope, *, trust_forwarded: bool) -> str | None:
    """The client's address; behind Gradio's share relay (a loopback connection on a shared
    app), the last `X-Forwarded-For` entry, the one the relay added."""
    client = scope.get("client")
    address = client[0] if client else None
    ip = _ip(address) if address else None
    if trust_forwarded and ip is not None and ip.is_loopback:
        forwarded = ",".join(Headers(scope=scope).getlist("x-forwarded-for"))
        entries = [e.strip() for e in forwarded.split(",") if e.strip()]
        if entries and _ip(entries[-1]) is not None:
            return entries[-1]
    return address


# --------------------------------------------------------------------------- uploads


@dataclass(frozen=True)
class UploadPolicy:
    max_files: int  # files (and, separately, plain fields) in one upload request
    other_max_bytes: int  # a file whose name does not end in .safetensors
    quota_bytes: int  # the upload folder's uploads plus uploads in flight
    usage: Callable[[], int]  # bytes the upload folder's uploads hold now


class UploadRefused(MultiPartException):
    """Raised inside Gradio's upload parser (which then deletes the request's temp files)."""

    def __init__(self, message: str, status: int = 413):
        super().__init__(message)
        self.status = status


def upload_bytes(paths: Iterable[str]) -> int:
    """Bytes the given upload files hold on disk (gone ones count nothing)."""
    total = 0
    for path in list(paths):
        try:
            total += os.stat(path).st_size
        except OSError:
            continue
    return total


class _UploadWatcher:
    """Reads the multipart stream beside Gradio's parser and raises UploadRefused on a bound."""

    def __init__(self, boundary: bytes, policy: UploadPolicy):
        self.policy = policy
        self.files = self.fields = 0
        self.name: str | None = None
        self.is_file = False
        self.part_bytes = 0
        self._header_field = b""
        self._header_value = b""
        self._disposition = b""
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field_cb,
                "on_header_value": self._header_value_cb,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
            },
        )

    def feed(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except MultipartParseError as exc:
            raise UploadRefused(f"malformed upload: {exc}", 400) from exc

    def _part_begin(self) -> None:
        self.part_bytes = 0
        self._disposition = b""

    def _header_field_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_field.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_field = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self.is_file = b"filename" in options
        if self.is_file:
            self.files += 1
            self.name = options[b"filename"].decode("utf-8", "replace")
            if self.files > self.policy.max_files:
                raise UploadRefused(f"too many files in one upload: at most {self.policy.max_files}")
        else:
            self.fields += 1
            if self.fields > self.policy.max_files:
                raise UploadRefused(f"too many form fields in one upload: at most {self.policy.max_files}")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self.part_bytes += end - start
        if not self.is_file:
            if self.part_bytes > FIELD_MAX_BYTES:
                raise UploadRefused(f"a form field in an upload is over {FIELD_MAX_BYTES // 1024} KiB")
        elif self.part_bytes > self.policy.other_max_bytes and not (self.name or "").lower().endswith(LORA_SUFFIX):
            raise UploadRefused(
                f"{self.name!r} is over {self.policy.other_max_bytes / MiB:g} MiB; only LoRA files "
                f"({LORA_SUFFIX}) may be larger"
            )


# --------------------------------------------------------------------------- the middleware


async def _plain(send: Send, status: int, text: str, headers: dict[str, str] | None = None) -> None:
    body = (text + "\n").encode()
    raw = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"x-content-type-options", b"nosniff"),
        *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _session_tokens(scope: Scope) -> tuple[dict, list[str]]:
    """Gradio's live logins (token -> user) and the login tokens this request's cookies carry."""
    app = scope.get("app")
    tokens = getattr(app, "tokens", None)
    cookie_id = getattr(app, "cookie_id", None)
    if not isinstance(tokens, dict) or cookie_id is None:
        return {}, []  # not Gradio's app as we know it: nobody is logged in (fails closed)
    cookies = cookie_parser(Headers(scope=scope).get("cookie", ""))
    names = (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}")
    return tokens, [cookies[name] for name in names if cookies.get(name)]


def logged_in(scope: Scope) -> bool:
    """Whether the request carries the cookie of a live Gradio login."""
    tokens, mine = _session_tokens(scope)
    return any(tokens.get(token) is not None for token in mine)


@dataclass(frozen=True)
class Guards:
    """Everything the middleware enforces; `launch` builds one per app."""

    hosts: HostPolicy
    login: LoginGuard
    uploads: UploadPolicy
    auth: bool  # the app has a password
    trust_forwarded: bool  # shared: loopback connections come from the share relay

    def middleware(self) -> Middleware:
        return Middleware(GuardMiddleware, guards=self)


class GuardMiddleware:
    def __init__(self, app: ASGIApp, guards: Guards):
        self.app = app
        self.guards = guards
        self._uploads_in_flight = 0  # bytes; only touched on the event loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self._foreign(scope)
        if refusal is not None:
            log.info("refused a request: %s", refusal[1])
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                await _plain(send, *refusal)
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if self.guards.auth:
            if path in LOGIN_PATHS and method == "POST":
                await self._login(scope, receive, send)
                return
            if path.startswith(API_PREFIX + "/") and path not in PUBLIC_API_PATHS and not logged_in(scope):
                await _plain(send, 401, "log in first")
                return
            if path in LOGOUT_PATHS:
                scope = _own_session_logout(scope)
            elif path == "/" and method == "GET" and not logged_in(scope):
                await self.app(scope, receive, _without_api_info(send))
                return
        if path in UPLOAD_PATHS and method == "POST":
            await self._upload(scope, receive, send)
            return
        await self.app(scope, receive, send)

    # ---- Host and Origin -----------------------------------------------------
    def _foreign(self, scope: Scope) -> tuple[int, str] | None:
        headers = Headers(scope=scope)
        host = headers.get("host")
        if not self.guards.hosts.allows(host_name(host)):
            return 421, f"this app is not served under the host {host!r}; see --allowed-hosts"
        origin = headers.get("origin")
        if origin is not None and not self.guards.hosts.allows(origin_host(origin)):
            return 403, f"requests from the origin {origin!r} are refused"
        return None

    # ---- logins --------------------------------------------------------------
    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > LOGIN_BODY_MAX:
                await _plain(send, 413, "login form too large")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        user = await _form_user(scope, body)
        address = client_address(scope, trust_forwarded=self.guards.trust_forwarded)
        guard = self.guards.login
        try:
            delay = guard.check(address, user)
        except LoginLocked as exc:
            await _plain(send, 429, str(exc), {"Retry-After": str(math.ceil(exc.retry_after_s))})
            return
        status: list[int] = []
        replayed: list[bool] = []

        async def replay() -> Message:
            if not replayed:
                replayed.append(True)
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            if delay:
                await asyncio.sleep(delay)
            await self.app(scope, replay, watch)
        finally:
            if status and status[0] == 200:  # Gradio answers a wrong password with 400
                guard.succeeded(address, user)
            else:
                guard.failed(address, user)

    # ---- uploads -------------------------------------------------------------
    async def _upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        policy = self.guards.uploads
        headers = Headers(scope=scope)
        length = headers.get("content-length", "")
        if not (length.isascii() and length.isdigit()):
            await _plain(send, 411, "uploads need a Content-Length", {"Connection": "close"})
            return
        length = int(length)
        used = policy.usage() + self._uploads_in_flight
        if used + length > policy.quota_bytes:
            await _plain(
                send,
                413,
                f"the upload folder is full ({used / MiB:.0f} of {policy.quota_bytes / MiB:.0f} MiB in use); "
                "uploads expire after a while, try again later",
                {"Connection": "close"},
            )
            return
        content_type, options = parse_options_header(headers.get("content-type", ""))
        watcher = None
        if content_type == b"multipart/form-data" and b"boundary" in options:
            watcher = _UploadWatcher(options[b"boundary"], policy)
        refused: list[UploadRefused] = []
        answered: list[bool] = []
        body_done: list[bool] = []

        async def guarded_receive() -> Message:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done.append(True)
            if watcher is not None and message["type"] == "http.request" and not refused:
                try:
                    watcher.feed(message.get("body", b""))
                except UploadRefused as exc:
                    refused.append(exc)
                    raise
            return message

        async def answer_refusal() -> None:
            answered.append(True)
            # Read the rest of the body (at most the quota allowed) first: a client still
            # sending when the connection closes would see a reset, not this answer.
            if not body_done:
                await _drain(receive)
            await _plain(send, refused[0].status, str(refused[0]))

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)
            elif message["type"] == "http.response.start" and not answered:
                await answer_refusal()

        self._uploads_in_flight += length
        try:
            await self.app(scope, guarded_receive, guarded_send)
        except UploadRefused:
            if not answered:
                await answer_refusal()
        finally:
            self._uploads_in_flight -= length
        if refused:
            log.info("refused an upload: %s", refused[0])


async def _drain(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _form_user(scope: Scope, body: bytes) -> str:
    """The stripped `username` field of a login form (as Gradio reads it), or ""."""

    async def once() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, once).form(max_files=0, max_fields=16)
    except (MultiPartException, MultipartParseError, ValueError, KeyError):
        return ""
    try:
        user = form.get("username")
        return user.strip() if isinstance(user, str) else ""
    finally:
        await form.close()


def _own_session_logout(scope: Scope) -> Scope:
    """`/logout` without `all_session`: only this browser's session ends (the login is shared).

    Its tokens are dropped here: Gradio's own-session logout looks only at the secure
    cookie, which a browser does not send over plain http."""
    query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    if any(key == "all_session" for key, _ in query):
        return scope
    tokens, mine = _session_tokens(scope)
    for token in mine:
        tokens.pop(token, None)
    query.append(("all_session", "false"))
    return {**scope, "query_string": urlencode(query).encode("latin-1")}


def _without_api_info(send: Send) -> Send:
    """Send the login page without the API schema Gradio embeds in it (its /info says 401)."""
    start: list[Message] = []
    body: list[bytes] = []

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            start.append(message)
            return
        if message["type"] != "http.response.body" or not start:
            await send(message)
            return
        body.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        content = b"".join(body)
        headers = MutableHeaders(raw=list(start[0].get("headers", [])))
        if headers.get("content-type", "").startswith("text/html"):
            content = _API_INFO_SCRIPT.sub(lambda _match: _EMPTY_API_INFO, content)
            headers["content-length"] = str(len(content))
        await send({**start[0], "headers": headers.raw})
        await send({"type": "http.response.body", "body": content})

    return wrapped
