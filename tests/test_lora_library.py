"""The LoRA library: adding from links, the Hub and uploads, several processes at once,
refusals that leave nothing behind, hand-dropped files, delete, and LoRAs in jobs.

Every link is served by a loopback HTTP server (allow_private=True); the Hub is
patched at huggingface_hub's function boundary. Never the real network.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lora_factory import (
    make_big_real_flux_lora,
    make_kohya_lora,
    make_peft_lora,
    make_pickle,
    make_sdxl_lora,
    make_tiny_transformer,
    make_truncated,
)
from lora_server import LoraServer, add_and_hang, add_in_child, leftovers
from masuka.net import safe as netsafe
from masuka.net.transfers import AmbiguousSourceError, DownloadError
from masuka.core.runner import JobFailed
from masuka.lora.library import LoraInUse, LoraLibrary, fit_checker, name_from_filename
from masuka.settings import Settings
from conftest import pixels, run

pytestmark = pytest.mark.timeout(120)

CIVITAI_PATH = "/api/download/models/4242"
DISPOSITION = {"Content-Disposition": 'attachment; filename="Neon Style (v2).safetensors"'}


@pytest.fixture
def settings(home):
    # The studio of these tests may fetch from the loopback test server.
    return Settings(home=home, allow_private_urls=True)


@pytest.fixture
def server():
    srv = LoraServer()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """LoRA files (and broken ones) built once: kohya/peft for the tiny model, SDXL, pickle, real-size."""
    d = tmp_path_factory.mktemp("lorafiles")
    t = make_tiny_transformer()
    kohya = make_kohya_lora(t, d / "kohya.safetensors", seed=1, metadata={"trigger_phrase": "neon glow"})
    return SimpleNamespace(
        kohya=kohya,
        peft=make_peft_lora(t, d / "peft.safetensors", seed=2),
        other=make_peft_lora(t, d / "other.safetensors", seed=3),
        truncated=make_truncated(kohya, d / "truncated.safetensors", 1000),
        sdxl=make_sdxl_lora(d / "sdxl.safetensors"),
        pickle=make_pickle(d / "style.ckpt"),
        big=make_big_real_flux_lora(d / "big.safetensors"),
        transformer=t,
    )


def library(tmp_path: Path, **kw) -> LoraLibrary:
    kw.setdefault("allow_private", True)
    return LoraLibrary(tmp_path / "loras", **kw)


def registry(folder: Path) -> dict:
    return json.loads((folder / ".registry.json").read_text())


# --------------------------------------------------------------------------- adding from a link


def test_link_without_extension_is_judged_by_content_and_recorded(server, tmp_path, files):
    data = files.kohya.read_bytes()
    url = server.add(CIVITAI_PATH, data, headers=DISPOSITION)
    lib = library(tmp_path)
    rec = lib.add_source(url)
    assert rec.name == "Neon_Style_v2" and rec.state == "usable"
    assert (rec.sha256, rec.size_bytes, rec.format) == (hashlib.sha256(data).hexdigest(), len(data), "kohya")
    assert rec.source == url and rec.trigger_words == ["neon glow"] and rec.added_at > 0
    assert "path" not in rec.public()
    assert leftovers(lib.folder) == ["Neon_Style_v2.safetensors"]
    assert registry(lib.folder)["Neon_Style_v2"]["sha256"] == rec.sha256
    # Added again: found in the registry, no second request.
    assert lib.add_source(url).sha256 == rec.sha256
    assert server.started[CIVITAI_PATH] == 1
    # Another process (a fresh library on the same folder) sees the same record.
    again = LoraLibrary(lib.folder).get("Neon_Style_v2")
    assert (again.source, again.trigger_words) == (url, ["neon glow"])


def test_name_given_or_from_url(server, tmp_path, files):
    lib = library(tmp_path)
    a = lib.add_source(server.add("/files/my.style.safetensors", files.kohya.read_bytes()))
    assert a.name == "my.style"
    b = lib.add_source(server.add("/x", files.peft.read_bytes()), name="chosen-name_1")
    assert b.name == "chosen-name_1" and b.format == "diffusers"
    assert sorted(r.name for r in lib.scan()) == ["chosen-name_1", "my.style"]


def test_three_processes_add_the_same_url_once(server, tmp_path, files):
    data = files.kohya.read_bytes()
    # Slow enough (about a second) that all three are inside add_source together.
    url = server.add(CIVITAI_PATH, data, headers=DISPOSITION, chunk=4096, delay=0.12)
    folder = tmp_path / "loras"
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=add_in_child, args=(str(folder), url, barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(30)
    assert [o[0] for o in outcomes] == ["ok"] * 3, outcomes
    assert {o[1] for o in outcomes} == {"Neon_Style_v2"}
    assert {o[2] for o in outcomes} == {hashlib.sha256(data).hexdigest()}
    assert server.started[CIVITAI_PATH] == 1 and server.completed[CIVITAI_PATH] == 1
    assert list(registry(folder)) == ["Neon_Style_v2"]
    assert leftovers(folder) == ["Neon_Style_v2.safetensors"]


def test_cut_transfer_leaves_nothing_and_a_retry_succeeds(server, tmp_path, files):
    url = server.add(CIVITAI_PATH, files.kohya.read_bytes(), headers=DISPOSITION, chunk=4096, cut_times=1)
    lib = library(tmp_path)
    with pytest.raises(DownloadError, match="cut|closed|failed"):
        lib.add_source(url)
    assert leftovers(lib.folder) == [] and lib.scan() == []
    rec = lib.add_source(url)
    assert rec.state == "usable" and server.started[CIVITAI_PATH] == 2
    assert leftovers(lib.folder) == ["Neon_Style_v2.safetensors"]


@pytest.mark.parametrize(
    "limits, message",
    [
        ({"download_min_rate_kib": 50, "download_rate_window_s": 0.5},
         r"^download too slow: 0\.0\d KiB/s over the last 0\.5\d* s; the minimum is 50 KiB/s"),
        ({"download_timeout_s": 0.5, "download_min_rate_kib": 0}, r"took longer than 0\.5 s"),
    ],
)
def test_a_trickling_link_is_given_up_and_leaves_nothing(server, tmp_path, limits, message):
    """A server sending a byte every 50 ms no longer holds a download slot for minutes."""
    url = server.add("/trickle.safetensors", b"x" * 4096, chunk=1, delay=0.05)
    lib = library(tmp_path, **limits)
    start = time.monotonic()
    with pytest.raises(DownloadError, match=message):
        lib.add_source(url, "trickle")
    assert time.monotonic() - start < 10  # the whole body would take 200 s
    assert leftovers(lib.folder) == [] and lib.scan() == []
    assert server.completed["/trickle.safetensors"] == 0


def test_sigkill_mid_download_leaves_nothing_that_looks_complete(server, tmp_path, files):
    data = files.kohya.read_bytes()
    url = server.add("/slow", data, chunk=1024, delay=0.2)  # about 6 s
    folder = tmp_path / "loras"
    proc = multiprocessing.get_context("spawn").Process(target=add_and_hang, args=(str(folder), url))
    proc.start()
    deadline = time.time() + 60
    while server.bytes_sent["/slow"] < 4096 and time.time() < deadline:
        time.sleep(0.05)
    assert server.bytes_sent["/slow"] >= 4096
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    lib = library(tmp_path)
    assert lib.scan() == []
    assert all(Path(p).name.startswith(".") for p in leftovers(folder))  # only a hidden partial may remain
    with pytest.raises(ValueError, match="not in the library"):
        lib.get("killed")
    # Its locks died with it: a retry goes through at once.
    server.routes["/slow"].delay = 0
    assert lib.add_source(url, "killed").sha256 == hashlib.sha256(data).hexdigest()


def test_scan_removes_old_leftovers_of_killed_processes(tmp_path, files):
    lib = library(tmp_path)
    incoming = lib.folder / ".incoming"
    incoming.mkdir(parents=True)
    old = [incoming / ".0123abcd.safetensors.k2j4h5g6.incomplete", incoming / "0123abcd.safetensors",
           lib.folder / ".registry.x1y2z3.tmp"]
    fresh = incoming / ".4567cdef.safetensors.a1b2c3d4.incomplete"
    for p in old + [fresh]:
        p.write_bytes(b"partial")
    for p in old:
        os.utime(p, (time.time() - 7200, time.time() - 7200))
    assert lib.scan() == []
    assert [p for p in old if p.exists()] == [] and fresh.exists()  # a recent one may still be running


# --------------------------------------------------------------------------- refusals


def _redirect_to_private(server, monkeypatch, files):
    secret = server.add("/secret", files.kohya.read_bytes())
    first = server.add("/go", location=secret, status=302)
    real = netsafe.check_url

    def first_hop_is_public(url, *, allow_private):
        # Stands in for a public host: only the first URL is let through.
        return real(url, allow_private=True if url == first else allow_private)

    monkeypatch.setattr(netsafe, "check_url", first_hop_is_public)
    return first, {"allow_private": False}


REFUSALS = {
    "truncated": (lambda s, m, f: (s.add("/t", f.truncated.read_bytes()), {}), ["incomplete"]),
    "pickle": (lambda s, m, f: (s.add("/api/download/models/9", f.pickle.read_bytes()), {}), ["pickle"]),
    "sdxl": (lambda s, m, f: (s.add("/sdxl.safetensors", f.sdxl.read_bytes()), {}), ["not a FLUX LoRA", "SDXL"]),
    "oversized": (
        lambda s, m, f: (s.add("/big.safetensors", f.kohya.read_bytes()), {"max_bytes": 20_000}),
        ["size cap"],
    ),
    "hostile name": (lambda s, m, f: (s.add("/k.safetensors", f.kohya.read_bytes()), {"name": "../../x"}),
                     ["'../../x'", "not allowed"]),
    "loopback without the switch": (
        lambda s, m, f: (s.add("/k.safetensors", f.kohya.read_bytes()), {"allow_private": False}),
        ["loopback", "MASUKA_ALLOW_PRIVATE_URLS"],
    ),
    "redirect to a private address": (_redirect_to_private, ["loopback", "/secret"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_with_a_clear_message_and_nothing_left(case, server, tmp_path, files, monkeypatch):
    build, words = REFUSALS[case]
    url, options = build(server, monkeypatch, files)
    name = options.pop("name", "")
    lib = library(tmp_path, **options)
    with pytest.raises(ValueError) as info:
        lib.add_source(url, name)
    for word in words:
        assert word in str(info.value)
    assert lib.scan() == []
    assert leftovers(lib.folder) == []
    if case in ("hostile name", "loopback without the switch"):
        assert sum(server.started.values()) == 0  # refused before any transfer
    if case == "redirect to a private address":
        assert server.started["/secret"] == 0
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.safetensors").exists()


def test_refused_uploads_leave_nothing(tmp_path, files):
    lib = library(tmp_path)
    for path, word in ((files.pickle, "pickle"), (files.truncated, "incomplete"), (files.sdxl, "SDXL")):
        with pytest.raises(ValueError, match=word):
            lib.add_file(path)
    with pytest.raises(ValueError, match="larger than the LoRA size cap of 20000 bytes"):
        library(tmp_path, max_bytes=20_000).add_file(files.kohya)
    with pytest.raises(ValueError, match="not allowed"):
        lib.add_file(files.peft, "../../x")
    assert leftovers(lib.folder) == [] and lib.scan() == []


def test_same_name_same_content_is_returned_other_content_refused(server, tmp_path, files):
    lib = library(tmp_path)
    first = lib.add_file(files.kohya, "style")
    assert lib.add_source(server.add("/same", files.kohya.read_bytes()), "style").sha256 == first.sha256
    with pytest.raises(ValueError, match="'style' already exists with different content"):
        lib.add_source(server.add("/other", files.peft.read_bytes()), "style")
    with pytest.raises(ValueError, match="already exists"):
        lib.add_file(files.other, "style")
    assert leftovers(lib.folder) == ["style.safetensors"]
    assert lib.get("style").sha256 == first.sha256 == hashlib.sha256(files.kohya.read_bytes()).hexdigest()


def test_default_names():
    assert name_from_filename("Neon Style (v2).safetensors") == "Neon_Style_v2"
    assert name_from_filename("../../etc/passwd") == "passwd"
    assert name_from_filename("..safetensors") is None and name_from_filename(None) is None
    assert name_from_filename("a:b,c.safetensors") == "a_b_c"  # ':' and ',' stay free for "a:0.8,b"


# --------------------------------------------------------------------------- hand-dropped files


def test_hand_dropped_files_are_verified_on_scan(tmp_path, files):
    lib = library(tmp_path, fits=fit_checker(files.transformer))
    lib.folder.mkdir(parents=True)
    for src, name in ((files.kohya, "good.safetensors"), (files.truncated, "half.safetensors"),
                      (files.pickle, "old.ckpt"), (files.sdxl, "sdxl.safetensors"), (files.big, "real.safetensors")):
        (lib.folder / name).write_bytes(src.read_bytes())
    (lib.folder / "notes.txt").write_text("ignored")
    states = {r.name: (r.state, r.reason) for r in lib.scan()}
    assert set(states) == {"good", "half", "old.ckpt", "sdxl", "real"}
    assert states["good"] == ("usable", "")
    assert states["half"][0] == "refused" and "incomplete" in states["half"][1]
    assert states["old.ckpt"][0] == "refused" and "pickle" in states["old.ckpt"][1]
    assert states["sdxl"][0] == "refused" and "SDXL" in states["sdxl"][1]
    assert states["real"][0] == "not fitting" and "do not fit this model" in states["real"][1]
    assert lib.get("good").source == "folder" and lib.get("good").trigger_words == ["neon glow"]
    # The verdicts are kept: a restart on the same model reads no LoRA again.
    checker = fit_checker(files.transformer)

    def must_not_run(file):
        raise AssertionError(f"{file} checked again")

    must_not_run.key = checker.key
    again = {r.name: r.state for r in library(tmp_path, fits=must_not_run).scan()}
    assert again == {name: state for name, (state, _) in states.items()}
    # A file replaced by hand is judged again; a refused one can be deleted.
    (lib.folder / "good.safetensors").write_bytes(files.truncated.read_bytes())
    assert lib.get("good").state == "refused"
    lib.delete("old.ckpt")
    assert not (lib.folder / "old.ckpt").exists() and "old.ckpt" not in registry(lib.folder)


# --------------------------------------------------------------------------- the Hub


@pytest.fixture
def fake_hub(monkeypatch, tmp_path, files):
    import huggingface_hub

    repos = {
        "someone/neon-lora": {"pytorch_lora_weights.safetensors": files.kohya, "README.md": None},
        "someone/pack": {"a.safetensors": files.kohya, "sub/b.safetensors": files.peft},
    }
    calls: list[tuple[str, str]] = []

    def list_repo_files(self, repo_id, revision=None, token=None, **kw):
        return list(repos[repo_id])

    def get_hf_file_metadata(url, token=None, **kw):
        before, after = url.split("/resolve/", 1)  # https://huggingface.co/<repo>/resolve/<rev>/<file>
        repo_id, filename = "/".join(before.split("/")[-2:]), after.split("/", 1)[1]
        return SimpleNamespace(size=repos[repo_id][filename].stat().st_size)

    def hf_hub_download(repo_id, filename, revision=None, token=None, cache_dir=None, **kw):
        calls.append((repo_id, filename))
        return str(repos[repo_id][filename])

    def model_info(self, repo_id, token=None, **kw):
        return SimpleNamespace(card_data={"instance_prompt": "in neon style"} if repo_id == "someone/neon-lora" else {})

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", get_hf_file_metadata)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    return calls


def test_hub_repo_file_and_ambiguous_repo(fake_hub, tmp_path, files):
    lib = library(tmp_path)
    rec = lib.add_source("someone/neon-lora")
    assert rec.name == "neon-lora" and rec.source == "hf://someone/neon-lora"
    assert rec.trigger_words == ["in neon style", "neon glow"]  # model card first, then file metadata
    assert rec.sha256 == hashlib.sha256(files.kohya.read_bytes()).hexdigest()
    assert lib.add_source("someone/neon-lora").name == "neon-lora" and len(fake_hub) == 1
    with pytest.raises(AmbiguousSourceError) as info:
        lib.add_source("someone/pack")
    assert "a.safetensors" in str(info.value) and "sub/b.safetensors" in str(info.value)
    b = lib.add_source("someone/pack/sub/b.safetensors")
    assert (b.name, b.format, b.source) == ("b", "diffusers", "hf://someone/pack/sub/b.safetensors")
    assert leftovers(lib.folder) == ["b.safetensors", "neon-lora.safetensors"]


# --------------------------------------------------------------------------- LoRAs in jobs


def test_kohya_and_two_loras_combine_and_unload_cleanly(manager, server):
    t = manager.pipe.transformer
    folder = manager.loras.folder.parent / "src"
    kohya = make_kohya_lora(t, folder / "k.safetensors", seed=5)
    peft = make_peft_lora(t, folder / "p.safetensors", seed=6)
    assert manager.loras.add_source(server.add("/k.safetensors", kohya.read_bytes())).state == "usable"
    assert manager.loras.add_source(server.add("/p.safetensors", peft.read_bytes())).state == "usable"
    base = pixels(run(manager).images[0])
    with_k = pixels(run(manager, lora="k").images[0])
    assert not np.array_equal(base, with_k)
    both = run(manager, lora="k:0.8,p:0.5")
    assert sorted((lc["name"], lc["scale"]) for lc in both.record["loras"]) == [("k", 0.8), ("p", 0.5)]
    combined = pixels(both.images[0])
    assert not np.array_equal(combined, with_k) and not np.array_equal(combined, base)
    assert not np.array_equal(combined, pixels(run(manager, lora="k:0.8").images[0]))
    after = pixels(run(manager).images[0])
    assert manager.active_loras() == []
    assert manager.pipe.get_list_adapters() in ({}, {"transformer": []})  # no adapter left behind
    assert np.array_equal(after, base)  # back to the base pixels exactly


def test_not_fitting_lora_is_kept_and_its_job_fails_at_once(manager, server, files):
    rec = manager.loras.add_source(server.add("/real.safetensors", files.big.read_bytes()), "real")
    assert rec.state == "not fitting" and "do not fit this model" in rec.reason
    assert (manager.loras.folder / "real.safetensors").exists()
    steps = []
    with pytest.raises(JobFailed) as info:
        manager.generate(manager.validate(prompt="x", lora="real"), on_step=lambda d, t: steps.append(d))
    assert steps == [] and "do not fit this model" in info.value.reason
    record = manager.jobs.get(info.value.job_id)
    assert record["status"] == "failed" and "do not fit this model" in record["error"]
    assert run(manager).status == "completed"


def test_delete_refused_only_while_a_running_job_uses_it(manager, files):
    manager.loras.add_file(files.peft, "p")  # same shapes as the tiny model's transformer
    manager.loras.add_file(files.other, "q")
    refused = []

    def try_delete(done, total):
        if done == 1:
            for name in ("p", "q"):
                try:
                    manager.delete_lora(name)
                except LoraInUse as exc:
                    refused.append((name, str(exc)))

    job = manager.generate(manager.validate(prompt="x", lora="p", steps=2), on_step=try_delete)
    assert job.status == "completed"
    assert [name for name, _ in refused] == ["p"] and "running job" in refused[0][1]
    assert "q" not in manager.loras.usable_names()  # not used by the running job: deleted
    # "p" is still held by the pipeline, but no job is running: it may go now.
    assert manager.active_loras() and manager.loras_in_use() == set()
    manager.delete_lora("p")
    assert manager.lora_cache.used_bytes == 0  # its cached tensors are forgotten too
    assert not (manager.loras.folder / "p.safetensors").exists() and manager.loras.list() == []
    with pytest.raises(JobFailed, match="not in the library"):
        run(manager, lora="p")
    assert run(manager).status == "completed" and manager.active_loras() == []
