"""Edge overhead: MASUKA's `/generate` against a do-nothing Gradio app, and idle CPU.

    python bench/edge.py                        # 100 timed calls after 10 warm-ups, 256x256, 4 steps
    python bench/edge.py --calls 5 --warmup 1 --idle-seconds 2   # a quick smoke run (CI)
    python bench/edge.py --profile              # + where MASUKA's time beyond the pipeline goes

In one run on one machine it starts two servers, each in its own process:

* a bare Gradio app (same Gradio version) with one `gr.api` endpoint `/generate` that
  returns a pre-made PNG (`FileData`) and a small dict, queued like MASUKA's
  (`demo.queue(api_open=False)`); the PNG is one MASUKA made, so both apps send the
  same bytes;
* MASUKA's app on the built-in tiny model (`build_studio` + `launch(block=False)`),

and times, from this process, gradio_client `predict` calls alternating call by call
between the two apps, plus (c) the raw pipeline call for the same work (same pipeline
object, prompt, size, steps, seed, called like raw diffusers: `pipe(prompt=...)`) run
inside MASUKA's process between the calls.  MASUKA's overhead beyond the pipeline is
MASUKA's median per call minus the pipeline's median; the goal is at most 1.1x the bare
app's median per call.

Idle CPU: the CPU time (user + system, psutil) of each server process over
`--idle-seconds` with no client connected, once right after start and once after the
calls (client closed), as % of one core; per-thread figures say who burnt it.

Never reaches the network: GRADIO_ANALYTICS_ENABLED=False, HF_HUB_OFFLINE=1, and every
process of the run refuses connections and name lookups that are not loopback.

Prints markdown tables and writes them to `$OUT/edge.md` (+ `edge.json`) when `$OUT`
is set, or to `--out`.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import json
import logging
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.edge")

PROMPT = "a lighthouse on a cliff at dusk, waves, dramatic sky"
SEED = 1234
GOAL_RATIO = 1.1  # MASUKA's overhead beyond the pipeline / the bare app's per-call time
GOAL_IDLE_PCT = 1.0  # % of one core with no client connected
PROTO = "EDGE "  # the servers' protocol lines on stdout start with this
START_TIMEOUT_S = 300.0
COMMAND_TIMEOUT_S = 120.0
OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}
LOCAL_NAMES = {None, "", "localhost", "0.0.0.0", "::"}


# ---- no network ------------------------------------------------------------------


class NetworkRefused(OSError):
    pass


REFUSED = "bench/edge.py never reaches the network"
REFUSAL_LOG_MARK = "NETWORK REFUSED:"  # one log line per refusal; the servers' logs are searched for it
refusals: list[str] = []  # in this process


def _is_local(host: Any) -> bool:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if host in LOCAL_NAMES:
        return True
    try:
        addr = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False
    return addr.is_loopback or addr.is_unspecified


def forbid_network() -> None:
    """Refuse (NetworkRefused) any connection or name lookup that is not loopback, in this process."""
    os.environ.update(OFFLINE_ENV)
    real_connect, real_connect_ex, real_getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def refuse(what: str) -> NetworkRefused:
        refusals.append(what)
        log.warning("%s %s", REFUSAL_LOG_MARK, what)
        return NetworkRefused(f"{REFUSED}: refused {what}")

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            raise refuse(f"a connection to {address!r}")

    def connect(sock, address):
        check(sock, address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        check(sock, address)
        return real_connect_ex(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _is_local(host):
            raise refuse(f"a look-up of {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the servers (each in its own process) ---------------------------------------


def reply(payload: dict[str, Any]) -> None:
    sys.stdout.write(PROTO + json.dumps(payload, default=str) + "\n")
    sys.stdout.flush()


def thread_names() -> dict[str, str]:
    """Native thread id -> Python thread name, for per-thread CPU figures."""
    return {str(t.native_id): t.name for t in threading.enumerate() if t.native_id is not None}


def command_loop(handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> None:
    """Answer one JSON command a line on stdin until "quit" or end of input (blocking reads: no CPU)."""
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        name = cmd.get("cmd")
        if name == "quit":
            reply({"ok": True})
            return
        handler = handlers.get(name)
        try:
            if handler is None:
                raise ValueError(f"unknown command {name!r}")
            reply({"ok": True, **handler(cmd)})
        except Exception as exc:  # report to the client, keep serving
            log.exception("command %r failed", name)
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


def serve_bare(args: argparse.Namespace) -> None:
    """A do-nothing Gradio app: `/generate` returns a pre-made PNG and a small dict."""
    import gradio as gr
    from gradio.data_classes import FileData

    png_dir = Path(args.png_dir).resolve()
    png = {"file": png_dir / "missing.png"}  # set by the "png" command before any call

    def set_png(cmd: dict[str, Any]) -> dict[str, Any]:
        path = Path(cmd["path"]).resolve()
        if not path.is_relative_to(png_dir) or not path.is_file():
            raise ValueError(f"{path} is not a file in {png_dir}")
        png["file"] = path
        return {}

    def generate(
        prompt: str,
        lora: str = "",
        lora_scale: float = 1.0,
        seed: int = -1,
        steps: int | None = None,
        guidance: float | None = None,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
    ) -> tuple[list[FileData], dict]:
        file = png["file"]
        record = {"job_id": "bare", "status": "completed", "prompt": prompt, "seeds": [seed], "steps": steps,
                  "width": width, "height": height, "outputs": [file.name]}
        return [FileData(path=str(file), orig_name=file.name, mime_type="image/png")], record

    # gr.api reads the type hints; with postponed annotations FileData (imported here) would not resolve.
    generate.__annotations__ = {"prompt": str, "lora": str, "lora_scale": float, "seed": int, "steps": int | None,
                                "guidance": float | None, "width": int | None, "height": int | None,
                                "num_images": int, "return": tuple[list[FileData], dict]}

    with gr.Blocks(title="bare") as demo:
        gr.api(generate, api_name="generate", concurrency_limit=None)
    demo.queue(api_open=False, max_size=None, default_concurrency_limit=None)
    _app, url, _ = demo.launch(server_name="127.0.0.1", server_port=args.port, prevent_thread_lock=True,
                               quiet=True, allowed_paths=[str(png_dir)])
    set_queue_poll(demo, args.gradio_poll_s)
    spans = Spans()
    if args.profile:
        time_events(demo, spans)
    reply({"ready": url, "pid": os.getpid(), "loop_tid": loop_thread_id(demo)})
    command_loop({"png": set_png, **server_commands(spans, demo)})
    leave()


def loop_thread_id(demo: Any) -> int | None:
    """Native id of the thread that runs Gradio's server and event loop (uvicorn's)."""
    thread = getattr(getattr(demo, "server", None), "thread", None)
    return getattr(thread, "native_id", None)


def leave() -> None:
    """End a server process at once: demo.close() would wait seconds for uvicorn's streams to drain."""
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


class LoopProfile:
    """cProfile of Gradio's event-loop thread (a profiler only sees the thread that enables it)."""

    def __init__(self, demo: Any):
        servers = getattr(getattr(demo, "server", None), "servers", None) or []
        self.loop = getattr(servers[0], "_loop", None) if servers else None
        self.profiler: Any = None

    def _on_loop(self, fn: Callable[[], None]) -> None:
        import asyncio

        async def run() -> None:
            fn()

        if self.loop is None:
            raise RuntimeError("Gradio's event loop was not found")
        asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=30)

    def start(self, _cmd: dict[str, Any]) -> dict[str, Any]:
        import cProfile

        self.profiler = cProfile.Profile()
        self._on_loop(self.profiler.enable)
        return {}

    def stop(self, cmd: dict[str, Any]) -> dict[str, Any]:
        import io
        import pstats

        self._on_loop(self.profiler.disable)
        text = io.StringIO()
        stats = pstats.Stats(self.profiler, stream=text)
        stats.sort_stats(cmd.get("sort", "tottime")).print_stats(int(cmd.get("top", 25)))
        return {"profile": text.getvalue()}


def server_commands(spans: Spans, demo: Any) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
    def clear(_cmd: dict[str, Any]) -> dict[str, Any]:
        spans.clear()
        return {}

    loop_profile = LoopProfile(demo)
    return {
        "threads": lambda _c: {"threads": thread_names()},
        "spans": lambda _c: {"spans": spans.summary()},
        "clear_spans": clear,
        "loop_profile_start": loop_profile.start,
        "loop_profile_stop": loop_profile.stop,
    }


@dataclass
class Spans:
    """Durations (seconds) by name, recorded from any thread."""

    values: dict[str, list[float]] = field(default_factory=dict)
    marks: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    suffix: str = ""  # set while a job runs without Gradio (calls are sequential)

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            self.values.setdefault(name + self.suffix, []).append(seconds)

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        """Time every call of owner.attr (an instance attribute, even on a frozen dataclass)."""
        original = getattr(owner, attr)
        self.values.setdefault(name, [])  # reported with 0 calls if never called

        @functools.wraps(original)
        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                self.add(name, time.perf_counter() - start)

        object.__setattr__(owner, attr, timed)

    def summary(self) -> dict[str, dict[str, float]]:
        with self.lock:
            return {k: {"n": len(v), "median_ms": statistics.median(v) * 1000 if v else 0.0,
                        "mean_ms": statistics.fmean(v) * 1000 if v else 0.0}
                    for k, v in self.values.items()}

    def clear(self) -> None:
        with self.lock:
            for v in self.values.values():
                v.clear()


GRADIO_PHASES = {
    "process_api": "Gradio process_api (all of the below)",
    "preprocess_data": "Gradio preprocess",
    "call_function": "Gradio call_function (the endpoint, in a worker thread)",
    "postprocess_data": "Gradio postprocess (incl. output files)",
}


def time_events(demo: Any, spans: Spans) -> None:
    """Time Gradio's processing of each event: preprocess, the function, postprocess (incl. files)."""
    for attr, name in GRADIO_PHASES.items():
        original = getattr(demo, attr)

        async def timed(*a, _original=original, _name=name, **kw):
            start = time.perf_counter()
            try:
                return await _original(*a, **kw)
            finally:
                spans.add(_name, time.perf_counter() - start)

        setattr(demo, attr, timed)


def set_queue_poll(demo: Any, seconds: float | None) -> None:
    """Diagnostic: Gradio's queue loops poll, for new events every `sleep_when_free` s (1 ms on
    Linux) and for progress every `progress_update_sleep_when_free` s (10 ms), client or not."""
    if seconds is not None:
        demo._queue.sleep_when_free = seconds
        demo._queue.progress_update_sleep_when_free = seconds


def instrument(studio: Any, spans: Spans) -> None:
    """Time each part of a /generate call inside MASUKA's process (bench only, patched at the boundaries)."""
    import gradio.processing_utils as gpu

    import masuka.core.runner as runner_mod

    runner, jobs, pipe = studio.runner, studio.jobs, studio.loaded.pipe
    spans.wrap(studio, "validate", "validate (incl. tokenizer counts)")
    spans.wrap(jobs, "create", "job create (SQLite insert + commit)")
    spans.wrap(jobs, "set_seeds", "set_seeds (SQLite update + commit)")
    spans.wrap(jobs, "mark_running", "mark_running (SQLite update + commit)")
    spans.wrap(jobs, "mark_completed", "mark_completed (SQLite update + commit)")
    spans.wrap(jobs, "get", "jobs.get (SQLite read)")
    original_encode = pipe.encode_prompt

    def encode_prompt(*a, **kw):
        start = time.perf_counter()
        try:
            return original_encode(*a, **kw)
        finally:
            if kw.get("prompt_embeds") is None:  # not the pipeline's own no-op call
                runner_thread = threading.current_thread().name == "masuka-runner"
                spans.add("encode_prompt" if runner_thread else "raw call: its encode_prompt",
                          time.perf_counter() - start)

    pipe.encode_prompt = encode_prompt
    spans.wrap(studio, "submit", "submit (whole: record + queue)")
    spans.wrap(runner, "_run", "runner: the whole job (mark_running to the record)")
    original_save = runner_mod.save_image

    def save_image(*a, **kw):
        start = time.perf_counter()
        try:
            return original_save(*a, **kw)
        finally:
            spans.add("PNG save (encode + fsync + replace)", time.perf_counter() - start)

    runner_mod.save_image = save_image
    pipe_type = type(pipe)
    original_call = pipe_type.__call__

    def call(self, *a, **kw):
        start = time.perf_counter()
        try:
            return original_call(self, *a, **kw)
        finally:
            if kw.get("prompt_embeds") is not None:  # the runner's call, not the raw one
                spans.add("pipeline call (denoise + decode, prompt pre-encoded)", time.perf_counter() - start)

    pipe_type.__call__ = call
    original_finish, original_outcome, original_submit = runner._finish, studio.outcome, runner.submit

    def submit(*a, **kw):
        ticket = original_submit(*a, **kw)
        spans.marks[f"queued:{ticket.job_id}"] = time.perf_counter()
        return ticket

    original_mark_running = jobs.mark_running

    def mark_running(job_id, *a, **kw):
        queued = spans.marks.pop(f"queued:{job_id}", None)
        if queued is not None:
            spans.add("hand-off: submit -> worker starts the job", time.perf_counter() - queued)
        return original_mark_running(job_id, *a, **kw)

    def finish(ticket):
        spans.marks[f"done:{ticket.job_id}"] = time.perf_counter()
        return original_finish(ticket)

    def outcome(ticket):
        start = time.perf_counter()
        ticket.done.wait()
        woke = time.perf_counter()
        done = spans.marks.pop(f"done:{ticket.job_id}", None)
        if done is not None:
            spans.add("hand-off: job end -> waiting thread awake", woke - done)
        spans.add("wait for the job (outcome)", woke - start)
        return original_outcome(ticket)

    runner.submit = submit
    object.__setattr__(jobs, "mark_running", mark_running)
    runner._finish = finish
    object.__setattr__(studio, "outcome", outcome)
    # Listed with 0 calls when Gradio serves the output where it is (allowed_paths) instead of copying it.
    spans.wrap(gpu, "save_file_to_cache", "Gradio: copy the output into its cache (hash + copy)")
    time_garbage_collection(spans)


def time_garbage_collection(spans: Spans) -> None:
    """Python's cyclic GC pauses every thread: time each collection, by generation."""
    import gc

    started: dict[str, float] = {}

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started["t"] = time.perf_counter()
        elif "t" in started:
            spans.add(f"GC pause, generation {info['generation']} (any thread)", time.perf_counter() - started.pop("t"))

    gc.callbacks.append(callback)


def micro_save(image: Any, folder: Path, repeats: int = 9) -> dict[str, Any]:
    """The parts of a PNG save, apart: encode at some compress levels and with Z_RLE, fsync, replace."""
    import io
    import zlib

    out: dict[str, Any] = {}
    variants = {f"png_encode_level{level}": {"compress_level": level} for level in (0, 1, 6)}
    variants["png_encode_z_rle"] = {"compress_type": zlib.Z_RLE}
    for key, options in variants.items():
        times, size = [], 0
        for _ in range(repeats):
            buf = io.BytesIO()
            start = time.perf_counter()
            image.save(buf, format="PNG", **options)
            times.append(time.perf_counter() - start)
            size = buf.tell()
        out[key] = {"median_ms": statistics.median(times) * 1000, "bytes": size}
    data = io.BytesIO()
    image.save(data, format="PNG")
    blob = data.getvalue()
    fsyncs, replaces = [], []
    for i in range(repeats):
        tmp, final = folder / f".micro-{i}.partial", folder / f"micro-{i}.png"
        with open(tmp, "wb") as fh:
            fh.write(blob)
            fh.flush()
            start = time.perf_counter()
            os.fsync(fh.fileno())
            fsyncs.append(time.perf_counter() - start)
        start = time.perf_counter()
        os.replace(tmp, final)
        replaces.append(time.perf_counter() - start)
        final.unlink()
    out["fsync_ms"] = statistics.median(fsyncs) * 1000
    out["replace_ms"] = statistics.median(replaces) * 1000
    return out


def serve_masuka(args: argparse.Namespace) -> None:
    """MASUKA's app on the built-in tiny model, plus commands to time the raw pipeline in this process."""
    if args.masuka_root:  # another checkout's masuka (before/after comparisons), ahead of this one
        sys.path.insert(0, str(Path(args.masuka_root).resolve()))
    import torch

    from masuka.settings import Settings
    from masuka.store.outputs import image_metadata, save_image
    from masuka.studio import build_studio
    from masuka.web.server import launch

    home = Path(args.home)
    if args.models_dir:  # reuse a built tiny model (a symlink, like tests/conftest.py's seed_home)
        from masuka.model.tiny import ensure_tiny_model

        built = ensure_tiny_model(Path(args.models_dir))
        (home / "models").mkdir(parents=True, exist_ok=True)
        link = home / "models" / built.name
        if not link.exists():
            link.symlink_to(built, target_is_directory=True)
    settings = Settings(home=home, port=args.port,
                        db_backup=Path(args.db_backup_file) if args.db_backup_file else None)
    studio = build_studio(settings)
    spans = Spans()
    if args.profile:
        instrument(studio, spans)
    demo, url, _ = launch(settings, block=False, studio=studio, quiet=True)
    set_queue_poll(demo, args.gradio_poll_s)
    if args.profile:
        time_events(demo, spans)
    pipe, defaults = studio.loaded.pipe, studio.loaded.defaults

    def raw_image(cmd: dict[str, Any]):
        generator = torch.Generator(device="cpu").manual_seed(int(cmd.get("seed", SEED)))
        with torch.inference_mode():
            return pipe(prompt=cmd.get("prompt", PROMPT), width=cmd["size"], height=cmd["size"],
                        num_inference_steps=cmd["steps"], guidance_scale=defaults.guidance, generator=generator,
                        max_sequence_length=defaults.max_sequence_length).images[0]

    def raw(cmd: dict[str, Any]) -> dict[str, Any]:
        times, cpu = [], []
        with studio.runner._pipe_lock:  # never beside a job (the calls are sequential anyway)
            for _ in range(int(cmd.get("n", 1))):
                cpu0, start = time.process_time(), time.perf_counter()
                raw_image(cmd)
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - cpu0)
        return {"seconds": times, "cpu_seconds": cpu}

    def direct_job(cmd: dict[str, Any]) -> dict[str, Any]:
        """One job through the Studio in this process, without Gradio: MASUKA's own work, apart."""
        from masuka.studio import Caller

        spans.suffix = " [direct job]"
        try:
            start = time.perf_counter()
            request = studio.validate(prompt=cmd.get("prompt", PROMPT), seed=SEED, steps=cmd["steps"],
                                      width=cmd["size"], height=cmd["size"])
            result = studio.generate(request, Caller())
            seconds = time.perf_counter() - start
        finally:
            spans.suffix = ""
        if result.status != "completed":
            raise RuntimeError(f"job {result.job_id} ended {result.status}")
        return {"seconds": seconds}

    def sample(cmd: dict[str, Any]) -> dict[str, Any]:
        """The PNG the bare app serves: this pipeline's image, saved the way a job saves it."""
        with studio.runner._pipe_lock:
            image = raw_image(cmd)
        folder = Path(cmd["folder"])
        meta = image_metadata({"prompt": PROMPT, "steps": cmd["steps"], "guidance": defaults.guidance,
                               "width": cmd["size"], "height": cmd["size"], "loras": []},
                              seed=SEED, model=studio.loaded.spec, job_id="bare")
        path = save_image(image, folder, meta, stem="bare-sample")
        out: dict[str, Any] = {"png": str(path), "bytes": path.stat().st_size}
        if args.profile:
            out["micro"] = micro_save(image, path.parent)
            start = time.perf_counter()
            for _ in range(9):
                studio.validate(prompt=PROMPT, seed=SEED, steps=cmd["steps"], width=cmd["size"], height=cmd["size"])
            out["micro"]["validate_ms"] = (time.perf_counter() - start) / 9 * 1000
        return out

    import masuka

    reply({"ready": url, "pid": os.getpid(), "loop_tid": loop_thread_id(demo),
           "masuka": str(Path(masuka.__file__).parent)})
    command_loop({"raw": raw, "sample": sample, "job": direct_job, **server_commands(spans, demo)})
    studio.close()  # the job store and the runner; Gradio's server goes with the process
    leave()


# ---- the client side (this process) --------------------------------------------


class Server:
    """A server subprocess: its URL, its pid, and the command channel."""

    def __init__(self, kind: str, argv: list[str], work: Path, env: dict[str, str], label: str | None = None):
        self.kind = label or kind  # "bare", "masuka" or "compare" (a second MASUKA)
        self.log_path = work / f"{self.kind}-server.log"
        self._log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", kind, *argv],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1, env=env,
            cwd=str(work),
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.ready = False
        threading.Thread(target=self._pump, name=f"edge-{kind}-stdout", daemon=True).start()

    def wait_ready(self) -> None:
        ready = self._answer(START_TIMEOUT_S)
        self.url: str = ready["ready"]
        self.pid: int = ready["pid"]
        import psutil

        self.process = psutil.Process(self.pid)
        self.loop_tid: int | None = ready.get("loop_tid")
        self.package: str | None = ready.get("masuka")
        self.ready = True

    def cpu(self) -> tuple[float, float]:
        """CPU time so far (user + system, seconds): the whole server process, and its event-loop thread."""
        t = self.process.cpu_times()
        loop = next((x.user_time + x.system_time for x in self.process.threads() if x.id == self.loop_tid), 0.0)
        return t.user + t.system, loop

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PROTO):
                self._lines.put(line[len(PROTO):])
        self._lines.put(None)

    def _answer(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"{self.kind} server did not answer in {timeout:.0f} s; see {self.log_path}") from None
        if line is None:
            raise RuntimeError(f"{self.kind} server ended (exit {self.proc.wait()}):\n{self.log_tail()}")
        return json.loads(line)

    def command(self, cmd: str, **fields: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        self.proc.stdin.flush()
        answer = self._answer(COMMAND_TIMEOUT_S)
        if not answer.get("ok"):
            raise RuntimeError(f"{self.kind} server: {cmd} failed: {answer.get('error')}")
        return answer

    def log_tail(self, chars: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                if not self.ready:  # still starting: it would read "quit" only once started
                    raise RuntimeError("not started")
                self.command("quit")
                self.proc.wait(timeout=30)
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            self._log.close()


def cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def thread_cpu(pid: int) -> dict[str, float]:
    import psutil

    return {str(t.id): t.user_time + t.system_time for t in psutil.Process(pid).threads()}


def measure_idle(servers: list[Server], seconds: float) -> dict[str, dict[str, Any]]:
    """Each server's CPU over the same window, as % of one core, with its busiest threads."""
    names = {s.kind: s.command("threads")["threads"] for s in servers}
    before = {s.kind: (cpu_seconds(s.pid), thread_cpu(s.pid)) for s in servers}
    start = time.perf_counter()
    time.sleep(seconds)
    wall = time.perf_counter() - start
    out: dict[str, dict[str, Any]] = {}
    for s in servers:
        total0, threads0 = before[s.kind]
        threads1 = thread_cpu(s.pid)
        busy = sorted(
            ((tid, t1 - threads0.get(tid, 0.0)) for tid, t1 in threads1.items()), key=lambda kv: -kv[1]
        )
        out[s.kind] = {
            "pct": (cpu_seconds(s.pid) - total0) / wall * 100,
            "wall_s": wall,
            "threads": len(threads1),
            "thread_names": sorted(names[s.kind].values()),
            "busiest": [
                {"thread": names[s.kind].get(tid, f"native {tid}"), "pct": dt / wall * 100}
                for tid, dt in busy[:4] if dt > 0
            ],
        }
    return out


def load_note() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} CPU(s)"


@dataclass
class Series:
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.values)
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def ms(x: float) -> str:
    return f"{x * 1000:.1f} ms"


def pct(x: float) -> str:
    return f"{x:.2f} %"


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def masuka_argv(args: argparse.Namespace, work: Path, home: str, root: str | None, common: list[str]) -> list[str]:
    argv = ["--port", str(free_port()), "--home", str(work / home), *common]
    if root:
        argv += ["--masuka-root", str(Path(root).resolve())]
    if args.models_dir:
        argv += ["--models-dir", args.models_dir]
    if args.db_backup:
        argv += ["--db-backup-file", str(work / f"backup-{home}" / "masuka.db")]
    return argv


def timed_predict(server: Server, client: Any, call: dict[str, Any]) -> tuple[float, float, float, Any]:
    """One predict: (seconds, server CPU seconds, its event-loop thread's CPU seconds, result)."""
    cpu0, loop0 = server.cpu()
    start = time.perf_counter()
    out = client.predict(**call)
    seconds = time.perf_counter() - start
    cpu1, loop1 = server.cpu()
    return seconds, cpu1 - cpu0, loop1 - loop0, out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from gradio_client import Client

    env = {k: v for k, v in os.environ.items() if k not in ("GRADIO_SHARE", "MASUKA_AUTH", "OUT")} | OFFLINE_ENV
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    work = Path(tempfile.mkdtemp(prefix="masuka-edge-"))
    result: dict[str, Any] = {"args": vars(args), "load_before": load_note(), "work": str(work)}
    servers: list[Server] = []
    clients: dict[str, Any] = {}
    try:
        common = (["--profile"] if args.profile else []) + (
            ["--gradio-poll-s", str(args.gradio_poll_s)] if args.gradio_poll_s is not None else [])
        log.info("starting MASUKA's app (tiny model) and the bare Gradio app, each in its own process")
        bare_dir = work / "bare"
        bare_dir.mkdir()
        masuka = Server("masuka", masuka_argv(args, work, "home", args.masuka_root, common), work, env)
        servers.append(masuka)
        bare = Server("bare", ["--port", str(free_port()), "--png-dir", str(bare_dir), *common], work, env)
        servers.append(bare)
        if args.compare_root:
            servers.append(Server("masuka", masuka_argv(args, work, "home-compare", args.compare_root, common),
                                  work, env, label="compare"))
        for server in servers:
            server.wait_ready()
        compare = servers[2] if args.compare_root else None
        sample = masuka.command("sample", size=args.size, steps=args.steps, folder=str(bare_dir))
        bare.command("png", path=sample["png"])
        result["png_bytes"] = sample["bytes"]
        result["masuka_package"] = masuka.package
        result["compare_package"] = compare.package if compare else None
        result["micro"] = sample.get("micro")
        time.sleep(args.settle_seconds)
        log.info("idle CPU after start (no client), %.0f s", args.idle_seconds)
        result["idle_start"] = measure_idle(servers, args.idle_seconds)

        clients = {s.kind: Client(s.url, verbose=False) for s in servers}
        call = dict(prompt=PROMPT, lora="", lora_scale=1.0, seed=SEED, steps=args.steps, guidance=None,
                    width=args.size, height=args.size, num_images=1, api_name="/generate")
        times: dict[str, list[float]] = {s.kind: [] for s in servers} | {"pipeline": []}
        cpu: dict[str, list[float]] = {k: [] for k in times} | {f"{s.kind}_loop": [] for s in servers}
        direct: list[float] = []  # --profile: the same job through the Studio, no Gradio
        for i in range(args.warmup + args.calls):
            timed = i >= args.warmup
            # bare, then MASUKA (with --compare-root the two MASUKAs take turns going first), then the pipeline
            order = [bare, masuka, compare] if i % 2 == 0 else [bare, compare, masuka]
            for server in [s for s in order if s is not None]:
                seconds, server_cpu, loop_cpu, out = timed_predict(server, clients[server.kind], call)
                if server is not bare and (out[1].get("status") != "completed" or len(out[0]) != 1):
                    raise RuntimeError(f"{server.kind} call {i} did not complete: {out[1]}")
                if timed:
                    times[server.kind].append(seconds)
                    cpu[server.kind].append(server_cpu)
                    cpu[f"{server.kind}_loop"].append(loop_cpu)
            answer = masuka.command("raw", n=1, size=args.size, steps=args.steps)
            if args.profile:
                t_direct = masuka.command("job", size=args.size, steps=args.steps)["seconds"]
                if timed:
                    direct.append(t_direct)
            if timed:
                times["pipeline"].append(answer["seconds"][0])
                cpu["pipeline"].append(answer["cpu_seconds"][0])
            if i == args.warmup - 1 and args.profile:
                for server in (masuka, bare):
                    server.command("clear_spans")
                    if args.loop_profile:
                        server.command("loop_profile_start")
            if (i + 1) % 10 == 0:
                log.info("round %d: %s", i + 1, ", ".join(f"{k} {ms(v[-1])}" for k, v in times.items() if v))
        for client in clients.values():
            client.close()
        clients = {}
        result["calls"] = times
        result["cpu"] = cpu
        if direct:
            result["direct_job"] = direct
        if args.profile:
            result["spans"] = masuka.command("spans")["spans"]
            result["bare_spans"] = bare.command("spans")["spans"]
            if args.loop_profile:
                result["loop_profile"] = {s.kind: s.command("loop_profile_stop")["profile"] for s in (bare, masuka)}
        time.sleep(args.settle_seconds)
        log.info("idle CPU after the calls (client closed), %.0f s", args.idle_seconds)
        result["idle_after"] = measure_idle(servers, args.idle_seconds)
        result["load_after"] = load_note()
    finally:
        for client in clients.values():
            client.close()
        for server in reversed(servers):
            server.close()
        result["network_refused"] = len(refusals) + sum(
            s.log_path.read_text(encoding="utf-8", errors="replace").count(REFUSAL_LOG_MARK) for s in servers)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return result


def versions() -> str:
    from importlib.metadata import version  # not `import gradio`: seconds, for a version string

    packages = ("gradio", "gradio_client", "torch", "diffusers", "pillow")
    return ", ".join([f"Python {sys.version.split()[0]}"] + [f"{name} {version(name)}" for name in packages])


def compare_rows(result: dict[str, Any], bare: Series, pipe: Series) -> list[str]:
    """With --compare-root: the other MASUKA's rows, and the paired per-call difference."""
    if "compare" not in result["calls"]:
        return []
    this, other = Series(result["calls"]["masuka"]), Series(result["calls"]["compare"])
    overhead = other.median - pipe.median
    diff = Series([o - t for o, t in zip(other.values, this.values)])
    return [
        f"| MASUKA from `{result['compare_package']}`, per call | {ms(other.median)} | {ms(other.quantile(.1))} | "
        f"{ms(other.quantile(.9))} | | |",
        f"| its overhead / bare Gradio per call | x{overhead / bare.median:.2f} | | | ≤ x{GOAL_RATIO:g} | "
        f"{met(overhead / bare.median <= GOAL_RATIO)} |",
        f"| per call, that MASUKA minus this one (paired, same round; p25 / p75) | {ms(diff.median)} | "
        f"{ms(diff.quantile(.25))} | {ms(diff.quantile(.75))} | | |",
    ]


def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    calls = result["calls"]
    bare, masuka, pipe = Series(calls["bare"]), Series(calls["masuka"]), Series(calls["pipeline"])
    overhead = masuka.median - pipe.median
    ratio = overhead / bare.median
    paired = statistics.median((m - p) / b for b, m, p in zip(bare.values, masuka.values, pipe.values))
    n = len(bare.values)
    lines = [
        f"# Edge overhead: MASUKA /generate vs a bare Gradio app ({args.size}x{args.size}, {args.steps} steps)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {versions()}; {result['load_before']} (before), "
        f"{result.get('load_after', '?')} (after)",
        "",
        f"| measurement (median of {n} calls, alternating) | median | p10 | p90 | goal | met |",
        "|---|---|---|---|---|---|",
        f"| bare Gradio app, per call | {ms(bare.median)} | {ms(bare.quantile(.1))} | {ms(bare.quantile(.9))} | | |",
        f"| MASUKA /generate, per call | {ms(masuka.median)} | {ms(masuka.quantile(.1))} | "
        f"{ms(masuka.quantile(.9))} | | |",
        f"| pipeline alone, per image | {ms(pipe.median)} | {ms(pipe.quantile(.1))} | {ms(pipe.quantile(.9))} | | |",
        f"| MASUKA overhead beyond the pipeline | {ms(overhead)} | | | ≤ {ms(GOAL_RATIO * bare.median)} | "
        f"{met(ratio <= GOAL_RATIO)} |",
        f"| overhead / bare Gradio per call | x{ratio:.2f} | | | ≤ x{GOAL_RATIO:g} | {met(ratio <= GOAL_RATIO)} |",
        *compare_rows(result, bare, pipe),
        "",
        f"| idle CPU, % of one core over {args.idle_seconds:g} s, no client | bare Gradio | MASUKA | "
        "MASUKA minus bare | goal (MASUKA) | met |",
        "|---|---|---|---|---|---|",
    ]
    for key, what in (("idle_start", "after start"), ("idle_after", "after the calls")):
        idle = result[key]
        b, m = idle["bare"]["pct"], idle["masuka"]["pct"]
        lines.append(f"| idle CPU {what} | {pct(b)} | {pct(m)} | {pct(m - b)} | ≤ {GOAL_IDLE_PCT:g} % | "
                     f"{met(m <= GOAL_IDLE_PCT)} |")
    cpu = {k: statistics.fmean(v) for k, v in result["cpu"].items()}  # means: psutil counts 10 ms ticks
    notes = [
        f"paired estimate (median over calls of (MASUKA - pipeline) / bare): x{paired:.2f}",
        f"server process CPU per call (means, less sensitive to other load than wall time): bare Gradio "
        f"{ms(cpu['bare'])}, MASUKA {ms(cpu['masuka'])}, pipeline alone {ms(cpu['pipeline'])}; MASUKA minus "
        f"pipeline minus bare: {ms(cpu['masuka'] - cpu['pipeline'] - cpu['bare'])}; of which Gradio's event-loop "
        f"thread: bare {ms(cpu['bare_loop'])}, MASUKA {ms(cpu['masuka_loop'])}",
        f"PNG returned by both apps: {result['png_bytes']:,} bytes (the bare app's is one MASUKA made)",
        f"network: {result['network_refused']} connection(s) or look-up(s) off this machine refused",
        f"MASUKA code measured: {result.get('masuka_package')}"
        + (f"; compared with: {result['compare_package']}" if result.get("compare_package") else ""),
    ]
    if result.get("compare_package"):
        for key, what in (("idle_start", "after start"), ("idle_after", "after the calls")):
            notes.append(f"idle CPU {what}, the compared MASUKA: {pct(result[key]['compare']['pct'])}")
    for key, what in (("idle_start", "after start"), ("idle_after", "after the calls")):
        for kind in ("bare", "masuka"):
            idle = result[key][kind]
            busiest = ", ".join(f"{t['thread']} {t['pct']:.2f} %" for t in idle["busiest"]) or "none"
            notes.append(f"idle {what}, {kind}: {idle['threads']} threads; busiest: {busiest}")
    lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    if result.get("direct_job"):
        job = Series(result["direct_job"]).median
        lines += ["", "## MASUKA's own work and the edge, apart (medians)", "",
                  f"- the same job through the Studio in MASUKA's process, no Gradio (validate, queue, record, "
                  f"pipeline, PNG): {ms(job)}; minus the pipeline alone: **{ms(job - pipe.median)}** (MASUKA's own work)",
                  f"- MASUKA /generate minus that job: **{ms(masuka.median - job)}** (the edge: Gradio, HTTP, SSE, "
                  f"download) against the bare app's whole call {ms(bare.median)}"]
    if result.get("spans"):
        lines += ["", f"## Where MASUKA's time goes (spans inside its process, median over {n} calls)", "",
                  "| span | median | mean | calls |", "|---|---|---|---|"]
        for name, s in result["spans"].items():
            lines.append(f"| {name} | {s['median_ms']:.2f} ms | {s['mean_ms']:.2f} ms | {s['n']} |")
        for name, s in result.get("bare_spans", {}).items():
            lines.append(f"| bare app: {name} | {s['median_ms']:.2f} ms | {s['mean_ms']:.2f} ms | {s['n']} |")
    if result.get("micro"):
        micro = result["micro"]
        lines += ["", "## PNG save and validation, apart (the sample image, median of 9)", ""]
        for key, value in micro.items():
            if isinstance(value, dict):
                lines.append(f"- {key}: {value['median_ms']:.2f} ms, {value['bytes']:,} bytes")
            else:
                lines.append(f"- {key}: {value:.2f} ms")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=100, help="timed calls to each app (after the warm-ups)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls to each app first")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--idle-seconds", type=float, default=20.0, help="each idle CPU window")
    p.add_argument("--settle-seconds", type=float, default=2.0, help="wait before each idle window")
    p.add_argument("--profile", action="store_true", help="time the parts of MASUKA's calls inside its process")
    p.add_argument("--loop-profile", action="store_true",
                   help="with --profile: cProfile Gradio's event-loop thread in both apps (written to edge.json)")
    p.add_argument("--db-backup", action="store_true", help="run MASUKA with a job-history backup file")
    p.add_argument("--gradio-poll-s", type=float, default=None,
                   help="diagnostic: set Gradio's queue poll intervals in both apps (Gradio's defaults on Linux: "
                   "0.001 s for new events, 0.01 s for progress); shows how much idle CPU is Gradio's own")
    p.add_argument("--models-dir", default=None, help="where the built-in tiny model is (built there if missing; "
                   "default: a fresh build in the run's temporary folder)")
    p.add_argument("--masuka-root", default=None,
                   help="run MASUKA's server from another checkout's masuka package (e.g. `git archive` of an "
                   "older commit), to compare before/after on the same machine")
    p.add_argument("--compare-root", default=None,
                   help="also run MASUKA from another checkout's masuka package, in a third process, alternating "
                   "with this one call by call: a before/after comparison under the same load")
    p.add_argument("--out", default=None, help="folder for edge.md/edge.json (default: $OUT when set)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (server logs)")
    # Internal: run one of the servers (this script starts them itself).
    p.add_argument("--serve", choices=("bare", "masuka"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--home", help=argparse.SUPPRESS)
    p.add_argument("--png-dir", help=argparse.SUPPRESS)
    p.add_argument("--db-backup-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.calls < 1 or args.warmup < 0 or args.idle_seconds <= 0:
        p.error("--calls must be at least 1, --warmup at least 0 and --idle-seconds positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The servers log like app.py does (INFO), to their log files.
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    forbid_network()
    if args.serve == "bare":
        serve_bare(args)
        return 0
    if args.serve == "masuka":
        serve_masuka(args)
        return 0
    result = run(args)
    table = markdown(result, args)
    sys.stdout.write("\n" + table)
    out = args.out or os.environ.get("OUT")
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "edge.md").write_text(table, encoding="utf-8")
        (folder / "edge.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
        log.info("wrote %s", folder / "edge.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
