"""A loopback HTTP server serving LoRA files for the library tests, and child-process helpers.

Routes map a path to a `Route` (body, headers, behaviour). The server counts the
requests it started and the bodies it sent in full, per path.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Route:
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200
    chunk: int = 64 * 1024
    delay: float = 0.0  # seconds between chunks
    cut_times: int = 0  # the first N requests send half of the body, then close
    location: str | None = None  # a redirect


class LoraServer:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.started: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()
        self.bytes_sent: Counter[str] = Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                path = self.path.split("?", 1)[0]
                self.close_connection = True
                with server.lock:
                    server.started[path] += 1
                    route = server.routes.get(path)
                    cut = route is not None and route.cut_times > 0
                    if cut:
                        route.cut_times -= 1
                if route is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(route.status)
                headers = dict(route.headers)
                if route.location:
                    headers["Location"] = route.location
                headers.setdefault("Content-Length", str(len(route.body)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Connection", "close")
                self.end_headers()
                body = route.body[: len(route.body) // 2] if cut else route.body
                try:
                    for i in range(0, len(body), route.chunk):
                        self.wfile.write(body[i : i + route.chunk])
                        self.wfile.flush()
                        with server.lock:
                            server.bytes_sent[path] += len(body[i : i + route.chunk])
                        if route.delay and i + route.chunk < len(body):  # none after the last chunk:
                            time.sleep(route.delay)  # the client may be done before "completed" counts
                except (BrokenPipeError, ConnectionResetError):
                    return
                if not cut:
                    with server.lock:
                        server.completed[path] += 1

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def add(self, path: str, body: bytes = b"", **kw) -> str:
        self.routes[path] = Route(body=body, **kw)
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def leftovers(folder: Path) -> list[str]:
    """Everything under the library folder except lock files, the registry and empty folders."""
    return sorted(
        str(p.relative_to(folder))
        for p in Path(folder).rglob("*")
        if p.is_file() and not p.name.endswith(".lock") and p.name != ".registry.json"
    )


def add_in_child(folder: str, url: str, barrier, results) -> None:
    """Run in a separate process: wait for the others, then add `url` to the library at `folder`."""
    import logging

    from masuka.lora.library import LoraLibrary

    logging.basicConfig(level=logging.WARNING)
    library = LoraLibrary(Path(folder), allow_private=True)
    barrier.wait(30)
    try:
        rec = library.add_source(url)
        results.put(("ok", rec.name, rec.sha256))
    except Exception as exc:  # reported to the test, which fails on it
        results.put(("error", type(exc).__name__, str(exc)))


def add_and_hang(folder: str, url: str) -> None:
    """Run in a separate process that the test kills with SIGKILL mid-download."""
    from masuka.lora.library import LoraLibrary

    LoraLibrary(Path(folder), allow_private=True).add_source(url, "killed")
