"""Downloads: once-only under concurrency (processes), atomic install, caps, cut transfers, SIGKILL, Hub path.

Everything is served from loopback HTTP servers (allow_private=True); the Hub is
patched at huggingface_hub's function boundary.
"""

from __future__ import annotations

import hashlib
import http.server
import re
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from masuka.net import transfers as downloads
from masuka.net.transfers import (
    AmbiguousSourceError,
    DownloadError,
    DownloadTooLargeError,
    cleanup_stale_partials,
    download_hub,
    download_url,
    filename_from_response,
    parse_source,
)

pytestmark = pytest.mark.timeout(60)

CHUNK = 64 * 1024
DATA = (hashlib.sha256(b"seed").digest() * (1536 * 1024 // 32 + 1))[: 1536 * 1024]  # 1.5 MiB
DATA_SHA = hashlib.sha256(DATA).hexdigest()
NAME = "lora.safetensors"


# --------------------------------------------------------------------------- local server


class FileServer:
    """Loopback HTTP/1.1 server with a few behaviours; counts requests and completed bodies per path."""

    def __init__(self, data: bytes = DATA, delay: float = 0.0):
        self.data = data
        self.delay = delay
        self.started: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()
        self.headers_seen: list[dict[str, str]] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                path = self.path.split("?", 1)[0]
                with server.lock:
                    server.started[path] += 1
                    server.headers_seen.append({k.lower(): v for k, v in self.headers.items()})
                self.close_connection = True
                handler = getattr(server, "route_" + path.strip("/").replace("-", "_"), None)
                if handler is None:
                    self._head(404, {"Content-Length": "9"})
                    self.wfile.write(b"not found")
                    return
                try:
                    if handler(self) is not False:
                        with server.lock:
                            server.completed[path] += 1
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _head(self, status, headers):
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Connection", "close")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _send_body(self, h, data: bytes, delay: float):
        for i in range(0, len(data), CHUNK):
            h.wfile.write(data[i : i + CHUNK])
            h.wfile.flush()
            if delay:
                time.sleep(delay)

    # routes ------------------------------------------------------------
    def route_file(self, h):
        h._head(200, {"Content-Length": str(len(self.data)),
                      "Content-Disposition": 'attachment; filename="Cool Style v2.safetensors"'})
        self._send_body(h, self.data, self.delay)

    def route_slow(self, h):
        h._head(200, {"Content-Length": str(len(self.data))})
        self._send_body(h, self.data, 0.03)

    def route_cut(self, h):
        h._head(200, {"Content-Length": str(len(self.data))})
        self._send_body(h, self.data[: len(self.data) // 4], 0)
        return False  # connection closes: body cut short

    def route_chunked(self, h):
        h._head(200, {"Transfer-Encoding": "chunked"})
        for i in range(0, len(self.data), CHUNK):
            part = self.data[i : i + CHUNK]
            h.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        h.wfile.write(b"0\r\n\r\n")

    def route_unsized(self, h):  # HTTP/1.0 style: no length, body ends when the connection closes
        h._head(200, {})
        self._send_body(h, self.data, 0)

    def route_hang(self, h):
        h._head(200, {"Content-Length": str(len(self.data))})
        self._send_body(h, self.data[: 2 * CHUNK], 0)
        self.stop.wait(30)
        return False

    def route_trickle(self, h):  # a byte every 50 ms: each read is well within the read timeout
        h._head(200, {"Content-Length": str(len(self.data))})
        for i in range(len(self.data)):
            if self.stop.wait(0.05):
                return False
            h.wfile.write(self.data[i : i + 1])
            h.wfile.flush()
        return None

    def route_redirect(self, h):
        h._head(302, {"Location": "/file", "Content-Length": "0"})


@pytest.fixture
def server():
    srv = FileServer()
    yield srv
    srv.close()


def leftovers(dest: Path) -> list[str]:
    """Every non-lock file in dest (final files and temp files)."""
    return sorted(p.name for p in dest.iterdir() if not p.name.endswith(".lock"))


def get(url: str, dest: Path, **kwargs):
    kwargs.setdefault("filename", NAME)
    kwargs.setdefault("max_bytes", 16 * 2**20)
    kwargs.setdefault("allow_private", True)
    return download_url(url, dest, **kwargs)


# --------------------------------------------------------------------------- basics


def test_download_installs_file_atomically(server, tmp_path):
    progress: list[tuple[int, int | None]] = []
    result = get(server.url("/file"), tmp_path, progress=lambda done, total: progress.append((done, total)))
    assert result.downloaded is True
    assert result.path == tmp_path / NAME
    assert result.path.read_bytes() == DATA
    assert result.sha256 == DATA_SHA and result.size_bytes == len(DATA)
    assert result.final_url == server.url("/file")
    assert result.suggested_filename == "Cool Style v2.safetensors"
    assert leftovers(tmp_path) == [NAME]
    assert progress[0] == (0, len(DATA)) and progress[-1] == (len(DATA), len(DATA))
    assert all(a[0] <= b[0] for a, b in zip(progress, progress[1:]))


def test_existing_file_is_returned_without_downloading(server, tmp_path):
    first = get(server.url("/file"), tmp_path)
    second = get(server.url("/file"), tmp_path)
    assert second.downloaded is False
    assert (second.sha256, second.size_bytes, second.path) == (first.sha256, first.size_bytes, first.path)
    assert server.started["/file"] == 1


def test_redirect_followed_and_final_url_reported(server, tmp_path):
    result = get(server.url("/redirect"), tmp_path)
    assert result.final_url == server.url("/file") and result.sha256 == DATA_SHA


def test_http_error_status(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        get(server.url("/missing"), tmp_path)
    assert info.value.status_code == 404
    assert leftovers(tmp_path) == []


def test_refused_url_is_value_error(server, tmp_path):
    with pytest.raises(ValueError, match="loopback"):
        get(server.url("/file"), tmp_path, allow_private=False)
    assert server.started["/file"] == 0
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("bad", ["", ".hidden", "../x.safetensors", "a/b.safetensors", "x\x00y", "a.incomplete"])
def test_bad_filename_refused(server, tmp_path, bad):
    with pytest.raises(ValueError, match="file name"):
        get(server.url("/file"), tmp_path, filename=bad)
    assert server.started["/file"] == 0


# --------------------------------------------------------------------------- failures leave nothing behind


def test_cut_transfer_raises_and_cleans_up_then_retry_succeeds(server, tmp_path):
    with pytest.raises(DownloadError) as info:
        get(server.url("/cut"), tmp_path)
    assert "/cut" in str(info.value)
    assert leftovers(tmp_path) == []
    result = get(server.url("/file"), tmp_path)
    assert result.downloaded and result.sha256 == DATA_SHA
    assert leftovers(tmp_path) == [NAME]


@pytest.mark.parametrize("path", ["/file", "/chunked", "/unsized"])
def test_oversized_refused_naming_cap(server, tmp_path, path):
    cap = 1024 * 1024
    with pytest.raises(DownloadTooLargeError, match=r"cap of 1\.0 MiB \(1048576 bytes\)") as info:
        get(server.url(path), tmp_path, max_bytes=cap)
    assert isinstance(info.value, ValueError) and isinstance(info.value, DownloadError)
    assert info.value.max_bytes == cap
    assert leftovers(tmp_path) == []


def test_chunked_and_unsized_within_cap_succeed(server, tmp_path):
    for i, path in enumerate(["/chunked", "/unsized"]):
        result = get(server.url(path), tmp_path, filename=f"f{i}.safetensors")
        assert result.sha256 == DATA_SHA


def test_verify_refusal_leaves_nothing(server, tmp_path):
    seen: list[Path] = []

    def verify(path: Path) -> None:
        seen.append(path)
        assert path.parent == tmp_path and path.name.endswith(".incomplete")
        assert path.read_bytes() == DATA  # complete and flushed before verification
        raise ValueError("not a LoRA file")

    with pytest.raises(ValueError, match="not a LoRA file"):
        get(server.url("/file"), tmp_path, verify=verify)
    assert len(seen) == 1 and not seen[0].exists()
    assert leftovers(tmp_path) == []


def test_verify_accepting_installs(server, tmp_path):
    result = get(server.url("/file"), tmp_path, verify=lambda p: None)
    assert result.path.exists()


def test_keyboard_interrupt_mid_download_cleans_up(server, tmp_path):
    def interrupt(done, total):
        if done > 3 * CHUNK:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        get(server.url("/file"), tmp_path, progress=interrupt)
    assert leftovers(tmp_path) == []


def test_tokens_never_logged(server, tmp_path, caplog):
    caplog.set_level("DEBUG")
    get(server.url("/file?token=QUERYSECRET"), tmp_path, headers={"Authorization": "Bearer HEADERSECRET"})
    assert server.headers_seen[-1]["authorization"] == "Bearer HEADERSECRET"
    assert "QUERYSECRET" not in caplog.text and "HEADERSECRET" not in caplog.text



def test_overall_time_limit(server, tmp_path):
    with pytest.raises(DownloadError, match="longer than 0.2 s"):
        get(server.url("/slow"), tmp_path, max_seconds=0.2)
    assert leftovers(tmp_path) == []


def test_trickle_below_the_minimum_rate_fails_fast_and_leaves_nothing(server, tmp_path):
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        get(server.url("/trickle"), tmp_path, min_rate=50 * 1024, rate_window_s=0.5)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert re.match(r"download too slow: 0\.0\d KiB/s over the last 0\.5\d* s", message), message
    assert "; the minimum is 50 KiB/s" in message and "MASUKA_DOWNLOAD_MIN_RATE" in message
    assert elapsed < 5  # the whole body would take 1.5 MiB x 50 ms = 22 hours
    assert leftovers(tmp_path) == []
    assert server.completed["/trickle"] == 0


def test_overall_deadline_stops_a_trickle(server, tmp_path):
    with pytest.raises(DownloadError, match="took longer than 0.4 s; aborted .*MASUKA_DOWNLOAD_TIMEOUT"):
        get(server.url("/trickle"), tmp_path, max_seconds=0.4)
    assert leftovers(tmp_path) == []


def test_a_steady_download_passes_the_rate_check(server, tmp_path):
    # /slow sends 64 KiB every 30 ms (~2 MiB/s) for ~0.7 s: several windows of 0.2 s are judged.
    result = get(server.url("/slow"), tmp_path, min_rate=256 * 1024, rate_window_s=0.2, max_seconds=30)
    assert result.sha256 == DATA_SHA and leftovers(tmp_path) == [NAME]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"min_rate": 0}, ["min_rate", "positive", "0"]),
        ({"min_rate": -5}, ["min_rate", "-5"]),
        ({"min_rate": float("nan")}, ["min_rate", "nan"]),
        ({"max_seconds": 0}, ["max_seconds", "positive"]),
        ({"max_seconds": float("inf")}, ["max_seconds", "inf"]),
        ({"rate_window_s": 0}, ["rate_window_s", "positive"]),
    ],
)
def test_bad_pace_arguments_are_refused_before_any_transfer(server, tmp_path, kwargs, words):
    with pytest.raises(ValueError) as info:
        get(server.url("/file"), tmp_path, **kwargs)
    for word in words:
        assert word in str(info.value)
    assert server.started["/file"] == 0


# --------------------------------------------------------------------------- concurrency (processes: test_lora_library)


def test_threads_download_once(server, tmp_path):
    out: list = []

    def run():
        out.append(get(server.url("/slow"), tmp_path))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(r.downloaded for r in out) == [False, False, True]
    assert server.started["/slow"] == 1


def test_cleanup_skips_partials_of_running_downloads(tmp_path):
    partial = tmp_path / f".{NAME}.abcd1234.incomplete"
    partial.write_bytes(b"x")
    other = tmp_path / ".other.safetensors.zzzz9999.incomplete"
    other.write_bytes(b"y")
    keep = tmp_path / "unrelated.incomplete"  # not one of ours
    keep.write_bytes(b"z")
    lock = downloads._lock_for(tmp_path, NAME, None)
    with lock:
        removed = cleanup_stale_partials(tmp_path, older_than_s=0)
    assert removed == [other]
    assert partial.exists() and keep.exists()


# --------------------------------------------------------------------------- names and headers


@pytest.mark.parametrize(
    "url, headers, expected",
    [
        ("https://civitai.com/api/download/models/123", {"Content-Disposition": 'attachment; filename="My LoRA.safetensors"'},
         "My LoRA.safetensors"),
        ("https://x/y", {"content-disposition": "attachment; filename*=UTF-8''caf%C3%A9%20v1.safetensors"},
         "café v1.safetensors"),
        ("https://x/y", {"Content-Disposition": 'attachment; filename="../../etc/passwd"'}, "passwd"),
        ("https://x/y", {"Content-Disposition": 'attachment; filename="..\\\\evil.safetensors"'}, "evil.safetensors"),
        ("https://x/y", {"Content-Disposition": 'attachment; filename=".bashrc"'}, "bashrc"),
        ("https://civitai.com/api/download/models/123", {}, "123"),
        ("https://h/path/to/file%20name.safetensors?download=true", None, "file name.safetensors"),
        ("https://h/", {}, None),
        ("https://h/dir/", {}, "dir"),
    ],
)
def test_filename_from_response(url, headers, expected):
    assert filename_from_response(url, headers) == expected


def test_civitai_token_only_for_civitai_over_https():
    env = {"CIVITAI_TOKEN": "tok"}
    h = downloads.request_headers("https://civitai.com/api/download/models/1", env=env)
    assert h["Authorization"] == "Bearer tok"
    assert downloads.request_headers("https://www.civitai.com/x", env=env)["Authorization"] == "Bearer tok"
    for url in ("http://civitai.com/x", "https://civitai.com.evil.example/x", "https://notcivitai.com/x",
                "https://huggingface.co/x"):
        assert "Authorization" not in downloads.request_headers(url, env=env), url
    assert "Authorization" not in downloads.request_headers("https://civitai.com/x", env={})
    mine = downloads.request_headers("https://civitai.com/x", {"authorization": "Bearer mine"}, env=env)
    assert mine == {"authorization": "Bearer mine", "Accept-Encoding": "identity"}


# --------------------------------------------------------------------------- parse_source


@pytest.mark.parametrize(
    "text, kind, repo, filename, revision",
    [
        ("https://civitai.com/api/download/models/12345", "url", None, None, None),
        ("http://example.com/x.safetensors", "url", None, None, None),
        ("  https://example.com/a  ", "url", None, None, None),
        ("owner/repo", "hub_repo", "owner/repo", None, None),
        ("hf://owner/repo", "hub_repo", "owner/repo", None, None),
        ("owner/repo/lora.safetensors", "hub_file", "owner/repo", "lora.safetensors", None),
        ("owner/repo/sub/dir/x.SafeTensors", "hub_file", "owner/repo", "sub/dir/x.SafeTensors", None),
        ("https://huggingface.co/owner/repo", "hub_repo", "owner/repo", None, None),
        ("https://huggingface.co/owner/repo/blob/main/x.safetensors", "hub_file", "owner/repo", "x.safetensors", "main"),
        ("https://huggingface.co/owner/repo/resolve/abc123/a/b.safetensors?download=true", "hub_file", "owner/repo",
         "a/b.safetensors", "abc123"),
        ("https://huggingface.co/datasets/owner/repo", "url", None, None, None),
    ],
)
def test_parse_source(text, kind, repo, filename, revision):
    src = parse_source(text)
    assert (src.kind, src.repo_id, src.filename, src.revision) == (kind, repo, filename, revision)
    if kind == "url":
        assert src.url and src.url.startswith("http")


@pytest.mark.parametrize(
    "text",
    ["", "   ", "justaname", "ftp://example.com/x", "file:///etc/passwd", "/abs/path.safetensors", "owner/",
     "owner/repo/../x.safetensors", "owner/repo/readme.md", "-bad/repo", "own er/repo", "C:\\loras\\x.safetensors"],
)
def test_parse_source_rejects(text):
    with pytest.raises(ValueError) as info:
        parse_source(text)
    assert repr(text) in str(info.value)


# --------------------------------------------------------------------------- Hub


class FakeHub:
    def __init__(self, monkeypatch, tmp_path: Path, files: list[str], size: int | None = None):
        import huggingface_hub

        self.files = files
        self.size = size
        self.cache = tmp_path / "hub-cache"
        self.cache.mkdir()
        self.calls: list[tuple] = []
        self.content = b"safetensors-bytes" * 1000
        hub = self

        def list_repo_files(api_self, repo_id, *, revision=None, repo_type=None, token=None):
            hub.calls.append(("list", repo_id, token))
            return list(hub.files)

        def get_hf_file_metadata(url, token=None, **kwargs):
            hub.calls.append(("meta", url, token))
            return SimpleNamespace(size=hub.size if hub.size is not None else len(hub.content), etag="e",
                                   commit_hash="c", location=url)

        def hf_hub_download(repo_id, filename, *, revision=None, token=None, cache_dir=None, **kwargs):
            hub.calls.append(("download", repo_id, filename, token))
            path = hub.cache / repo_id.replace("/", "--") / filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(hub.content)
            return str(path)

        monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
        monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", get_hf_file_metadata)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)

    def kinds(self) -> list[str]:
        return [c[0] for c in self.calls]


def test_hub_single_safetensors_picked(monkeypatch, tmp_path):
    hub = FakeHub(monkeypatch, tmp_path, ["README.md", ".gitattributes", "pytorch_lora_weights.safetensors"])
    dest = tmp_path / "loras"
    result = download_hub("owner/repo", None, dest, max_bytes=10**6)
    assert result.path == dest / "pytorch_lora_weights.safetensors"
    assert result.path.read_bytes() == hub.content
    assert result.sha256 == hashlib.sha256(hub.content).hexdigest()
    assert result.downloaded and result.size_bytes == len(hub.content)
    assert "owner/repo" in result.final_url
    assert hub.kinds() == ["list", "meta", "download"]
    assert leftovers(dest) == ["pytorch_lora_weights.safetensors"]
    again = download_hub("owner/repo", None, dest, max_bytes=10**6)
    assert again.downloaded is False and again.sha256 == result.sha256
    assert hub.kinds().count("download") == 1


def test_hub_several_safetensors_listed(monkeypatch, tmp_path):
    hub = FakeHub(monkeypatch, tmp_path, ["a.safetensors", "sub/b.safetensors", "c.bin"])
    with pytest.raises(AmbiguousSourceError, match=r"found 2: a\.safetensors, sub/b\.safetensors") as info:
        download_hub("owner/repo", None, tmp_path / "loras", max_bytes=10**6)
    assert info.value.candidates == ["a.safetensors", "sub/b.safetensors"]
    assert isinstance(info.value, ValueError)
    assert "download" not in hub.kinds()


def test_hub_no_safetensors(monkeypatch, tmp_path):
    FakeHub(monkeypatch, tmp_path, ["model.bin", "README.md"])
    with pytest.raises(AmbiguousSourceError, match="found 0: none") as info:
        download_hub("owner/repo", None, tmp_path / "loras", max_bytes=10**6)
    assert info.value.candidates == []


def test_hub_explicit_file_in_subfolder_and_token(monkeypatch, tmp_path, caplog):
    caplog.set_level("DEBUG")
    monkeypatch.setenv("HF_TOKEN", "hf_ENVSECRET")
    hub = FakeHub(monkeypatch, tmp_path, [])
    dest = tmp_path / "loras"
    result = download_hub("owner/repo", "sub/dir/style.safetensors", dest, max_bytes=10**6)
    assert result.path == dest / "style.safetensors"
    assert hub.kinds() == ["meta", "download"]
    assert hub.calls[-1] == ("download", "owner/repo", "sub/dir/style.safetensors", "hf_ENVSECRET")
    download_hub("owner/repo", "other.safetensors", dest, token="hf_ARGSECRET", max_bytes=10**6)
    assert hub.calls[-1][-1] == "hf_ARGSECRET"
    assert "SECRET" not in caplog.text


def test_hub_too_large_refused_before_download(monkeypatch, tmp_path):
    hub = FakeHub(monkeypatch, tmp_path, ["big.safetensors"], size=5 * 2**20)
    dest = tmp_path / "loras"
    with pytest.raises(DownloadTooLargeError, match=r"cap of 1\.0 MiB"):
        download_hub("owner/repo", None, dest, max_bytes=2**20)
    assert "download" not in hub.kinds()
    assert leftovers(dest) == []


def test_hub_verify_refusal_leaves_nothing(monkeypatch, tmp_path):
    FakeHub(monkeypatch, tmp_path, ["x.safetensors"])
    dest = tmp_path / "loras"

    def verify(path):
        raise ValueError("bad header")

    with pytest.raises(ValueError, match="bad header"):
        download_hub("owner/repo", "x.safetensors", dest, max_bytes=10**6, verify=verify)
    assert leftovers(dest) == []


def test_hub_errors_become_download_errors(monkeypatch, tmp_path):
    import httpx2
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    def missing(api_self, repo_id, **kwargs):
        response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/x/y"))
        raise hf_errors.RepositoryNotFoundError("Repository Not Found", response=response)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", missing)
    with pytest.raises(DownloadError, match="owner/nope: repository not found") as info:
        download_hub("owner/nope", None, tmp_path / "loras", max_bytes=10**6)
    assert info.value.status_code == 404


def test_hub_bad_repo_id(tmp_path):
    with pytest.raises(ValueError, match="repo id"):
        download_hub("not a repo", None, tmp_path, max_bytes=10)


def test_hub_instance_prompt(monkeypatch):
    import huggingface_hub
    from huggingface_hub import ModelCardData

    def info(api_self, repo_id, **kwargs):
        if repo_id == "owner/broken":
            raise OSError("offline")
        data = ModelCardData(instance_prompt="  TOK style  ") if repo_id == "owner/repo" else ModelCardData()
        return SimpleNamespace(card_data=data)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", info)
    assert downloads.hub_instance_prompt("owner/repo") == "TOK style"
    assert downloads.hub_instance_prompt("owner/plain", token="t") is None
    assert downloads.hub_instance_prompt("owner/broken") is None

