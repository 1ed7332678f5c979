"""Every flag and environment variable the README names does what it says.

`ROWS` maps each one to the Settings field it sets and to the tests that show its effect
(many live beside the feature; the ones that had none are below).  A README that gains a
flag or a variable without a row here fails `test_the_readme_names_nothing_without_a_row`;
a row whose test does not exist fails `test_every_effect_test_exists`.
"""

from __future__ import annotations

import ast
import re
import sqlite3
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from masuka.settings import build_parser, parse_settings

TESTS = Path(__file__).resolve().parent
README = TESTS.parent / "README.md"
SOMEWHERE = Path("/srv/masuka-flags")  # never created: paths are only parsed


@dataclass(frozen=True)
class Row:
    names: tuple[str, ...]  # as the README spells them: the flag(s), then the variable
    effects: tuple[str, ...]  # "test_file.py::test_name"
    setting: str | None = None  # the Settings field (None: read where it is used)
    argv: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    value: Any = None  # the field's value from argv, and from env
    base_env: dict[str, str] = field(default_factory=dict)  # where the default differs (Colab)


ROWS = (
    Row(("--help",), ("test_settings.py::test_help_documents_flags", "test_readme.py::test_every_flag_is_in_the_readme")),
    Row(("--model", "MASUKA_MODEL"),
        ("test_models.py::test_load_hub_id_passes_id_dtype_and_token",
         "test_models.py::test_single_file_transformer_loads_with_base_components"),
        "model", ("--model", "black-forest-labs/FLUX.1-schnell"),
        {"MASUKA_MODEL": "black-forest-labs/FLUX.1-schnell"}, "black-forest-labs/FLUX.1-schnell"),
    Row(("--base-model", "MASUKA_BASE_MODEL"),
        ("test_models.py::test_single_file_transformer_loads_with_base_components",
         "test_models.py::test_single_file_guesses_base_from_name_and_base_model_wins"),
        "base_model", ("--base-model", "someone/flux"), {"MASUKA_BASE_MODEL": "someone/flux"}, "someone/flux"),
    Row(("--home", "MASUKA_HOME"), ("test_flags.py::test_home_holds_the_history_the_library_and_the_images",),
        "home", ("--home", str(SOMEWHERE / "h")), {"MASUKA_HOME": str(SOMEWHERE / "h")}, (SOMEWHERE / "h").resolve()),
    Row(("--loras-dir", "MASUKA_LORAS_DIR"),
        ("test_backup.py::test_lora_locks_stay_on_local_disk_when_the_library_is_elsewhere",),
        "loras_dir", ("--loras-dir", str(SOMEWHERE / "l")), {"MASUKA_LORAS_DIR": str(SOMEWHERE / "l")},
        (SOMEWHERE / "l").resolve()),
    Row(("--outputs-dir", "MASUKA_OUTPUTS_DIR"),
        ("test_backup.py::test_runtime_reset_keeps_history_images_and_loras_on_drive",),
        "outputs_dir", ("--outputs-dir", str(SOMEWHERE / "o")), {"MASUKA_OUTPUTS_DIR": str(SOMEWHERE / "o")},
        (SOMEWHERE / "o").resolve()),
    Row(("--db-backup", "MASUKA_DB_BACKUP"),
        ("test_backup.py::test_runtime_reset_keeps_history_images_and_loras_on_drive",
         "test_backup.py::test_damaged_backup_is_kept_aside_and_the_app_starts_empty"),
        "db_backup", ("--db-backup", str(SOMEWHERE / "b.db")), {"MASUKA_DB_BACKUP": str(SOMEWHERE / "b.db")},
        (SOMEWHERE / "b.db").resolve()),
    Row(("--host", "GRADIO_SERVER_NAME"), ("test_flags.py::test_served_at_its_host_and_port_and_shared_by_a_tunnel",),
        "host", ("--host", "0.0.0.0"), {"GRADIO_SERVER_NAME": "0.0.0.0"}, "0.0.0.0"),
    Row(("--port", "GRADIO_SERVER_PORT"), ("test_flags.py::test_served_at_its_host_and_port_and_shared_by_a_tunnel",),
        "port", ("--port", "9123"), {"GRADIO_SERVER_PORT": "9123"}, 9123),
    Row(("--share", "GRADIO_SHARE"),
        ("test_flags.py::test_served_at_its_host_and_port_and_shared_by_a_tunnel",
         "test_security.py::test_share_link_without_password_refuses_to_start"),
        "share", ("--share",), {"GRADIO_SHARE": "1"}, True),
    Row(("--no-share",), ("test_settings.py::test_colab_shares_by_default",),
        "share", ("--no-share",), {"GRADIO_SHARE": "0"}, False, base_env={"COLAB_GPU": "1"}),
    Row(("--auth", "MASUKA_AUTH"),
        ("test_security.py::test_password_guards_page_api_and_files_and_jobs_record_the_user",),
        "auth", ("--auth", "ann:secret"), {"MASUKA_AUTH": "ann:secret"}, ("ann", "secret")),
    Row(("--device", "MASUKA_DEVICE"), ("test_flags.py::test_device_places_the_pipeline_and_a_missing_gpu_is_refused",),
        "device", ("--device", "cpu"), {"MASUKA_DEVICE": "cpu"}, "cpu"),
    Row(("--dtype", "MASUKA_DTYPE"), ("test_float16.py::test_float16_makes_finite_images_with_the_vae_in_float32",),
        "dtype", ("--dtype", "float16"), {"MASUKA_DTYPE": "float16"}, "float16"),
    Row(("--memory", "MASUKA_MEMORY"),
        ("test_memory.py::test_quantized_load_on_cpu_is_refused",
         "test_memory.py::test_cuda_profiles_are_refused_on_cpu_with_what_to_use",
         "test_memory.py::test_auto_load_on_a_t4_refuses_before_reading_weights",
         "test_memory.py::test_lora_leaves_the_pipeline_where_its_profile_put_it"),
        "memory", ("--memory", "offload"), {"MASUKA_MEMORY": "offload"}, "offload"),
    Row(("--compile", "MASUKA_COMPILE"),
        ("test_compile.py::test_compile_flag_compiles_at_start_with_a_logged_warm_up",
         "test_compile.py::test_compiled_model_never_recompiles_across_lora_switches_and_matches_eager",
         "test_compile.py::test_a_lora_only_adapters_could_apply_is_refused_under_compile_with_its_reason"),
        "compile", ("--compile",), {"MASUKA_COMPILE": "1"}, True),
    Row(("--plan",), ("test_plan.py::test_plan_t4_prints_the_table_and_loads_nothing",),
        "plan", ("--plan", "t4"), {}, "t4"),
    Row(("--queue-size", "MASUKA_QUEUE_SIZE"),
        ("test_security.py::test_queue_is_bounded_reads_answer_at_once_and_cannot_be_skipped",),
        "queue_size", ("--queue-size", "3"), {"MASUKA_QUEUE_SIZE": "3"}, 3),
    Row(("--rate-limit", "MASUKA_RATE_LIMIT"), ("test_security.py::test_rate_limit_through_the_api",),
        "rate_limit_per_minute", ("--rate-limit", "2"), {"MASUKA_RATE_LIMIT": "2"}, 2),
    Row(("--lora-max-mb", "MASUKA_LORA_MAX_MB"),
        ("test_flags.py::test_the_library_takes_its_limits_from_the_settings",
         "test_security.py::test_only_outputs_are_served_and_uploads_are_capped"),
        "lora_max_bytes", ("--lora-max-mb", "3"), {"MASUKA_LORA_MAX_MB": "3"}, 3 * 1024**2),
    Row(("--download-timeout", "MASUKA_DOWNLOAD_TIMEOUT"),
        ("test_flags.py::test_the_library_takes_its_limits_from_the_settings",),
        "download_timeout_s", ("--download-timeout", "90"), {"MASUKA_DOWNLOAD_TIMEOUT": "90"}, 90.0),
    Row(("--download-min-rate", "MASUKA_DOWNLOAD_MIN_RATE"),
        ("test_flags.py::test_the_library_takes_its_limits_from_the_settings",
         "test_lora_library.py::test_a_trickling_link_is_given_up_and_leaves_nothing"),
        "download_min_rate_kib", ("--download-min-rate", "7"), {"MASUKA_DOWNLOAD_MIN_RATE": "7"}, 7.0),
    Row(("MASUKA_ALLOW_PRIVATE_URLS",),
        ("test_flags.py::test_the_library_takes_its_limits_from_the_settings",
         "test_lora_library.py::test_refused_with_a_clear_message_and_nothing_left"),
        "allow_private_urls", (), {"MASUKA_ALLOW_PRIVATE_URLS": "1"}, True),
    Row(("--allowed-hosts", "MASUKA_ALLOWED_HOSTS"),
        ("test_guards.py::test_allowed_hosts_setting", "test_guards.py::test_a_rebound_name_gets_nothing_and_runs_nothing"),
        "allowed_hosts", ("--allowed-hosts", "studio.lan"), {"MASUKA_ALLOWED_HOSTS": "studio.lan"}, ("studio.lan",)),
    Row(("--upload-max-mb", "MASUKA_UPLOAD_MAX_MB"), ("test_guards.py::test_only_lora_files_may_be_large",),
        "upload_other_max_bytes", ("--upload-max-mb", "5"), {"MASUKA_UPLOAD_MAX_MB": "5"}, 5 * 1024**2),
    Row(("--upload-max-files", "MASUKA_UPLOAD_MAX_FILES"),
        ("test_guards.py::test_one_request_carries_at_most_four_files",),
        "upload_max_files", ("--upload-max-files", "2"), {"MASUKA_UPLOAD_MAX_FILES": "2"}, 2),
    Row(("--upload-quota-mb", "MASUKA_UPLOAD_QUOTA_MB"), ("test_guards.py::test_the_upload_folder_has_a_quota",),
        "upload_quota_bytes", ("--upload-quota-mb", "9000"), {"MASUKA_UPLOAD_QUOTA_MB": "9000"}, 9000 * 1024**2),
    Row(("--upload-expiry-min", "MASUKA_UPLOAD_EXPIRY_MIN"), ("test_guards.py::test_uploads_expire",),
        "upload_expiry_s", ("--upload-expiry-min", "30"), {"MASUKA_UPLOAD_EXPIRY_MIN": "30"}, 1800),
    Row(("--cache", "MASUKA_CACHE"),
        ("test_speed.py::test_fast_skips_steps_and_says_so_in_the_record_and_the_image",
         "test_flags.py::test_cache_settings_reach_fast_jobs"),
        "cache", ("--cache", "mag"), {"MASUKA_CACHE": "mag"}, "mag"),
    Row(("--cache-threshold", "MASUKA_CACHE_THRESHOLD"),
        ("test_flags.py::test_cache_settings_reach_fast_jobs",),
        "cache_threshold", ("--cache-threshold", "0.35"), {"MASUKA_CACHE_THRESHOLD": "0.35"}, 0.35),
    Row(("--fp8", "MASUKA_FP8"),
        ("test_fp8.py::test_fp8_is_refused_on_the_cpu_before_any_weight_is_read",
         "test_fp8.py::test_fp8_is_refused_on_a_t4_naming_its_capability",
         "test_fp8.py::test_fp8_on_an_l4_without_torchao_says_how_to_install_it",
         "test_fp8.py::test_loras_go_through_adapters_under_fp8"),
        "fp8", ("--fp8",), {"MASUKA_FP8": "1"}, True),
    Row(("HF_TOKEN",),
        ("test_models.py::test_load_hub_id_passes_id_dtype_and_token",
         "test_models.py::test_gated_model_without_token_is_refused_with_instructions",
         "test_downloads.py::test_hub_explicit_file_in_subfolder_and_token")),
    Row(("CIVITAI_TOKEN",), ("test_downloads.py::test_civitai_token_only_for_civitai_over_https",)),
)

# Upper-case names in the README that are not settings of the app.
NOT_SETTINGS = {
    "MASUKA_V2_COLAB": "the notebook's file name",
    "USE_DRIVE": "a field of the notebook's form (colab/build_notebook.py)",
    "REPO_URL": "a field of the notebook's form (colab/build_notebook.py)",
}

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
VARIABLE = re.compile(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]*[A-Z0-9]\b")


def readme_names() -> set[str]:
    text = README.read_text(encoding="utf-8")
    return set(FLAG.findall(text)) | set(VARIABLE.findall(text))


def names_in_rows() -> set[str]:
    return {name for row in ROWS for name in row.names}


def test_the_readme_names_nothing_without_a_row():
    missing = sorted(readme_names() - names_in_rows() - set(NOT_SETTINGS))
    assert not missing, f"README names {missing}: add a row to tests/test_flags.py with the test showing each effect"


def test_every_row_is_in_the_readme_and_every_flag_of_the_app_has_a_row():
    assert sorted(names_in_rows() - readme_names()) == []
    parser_flags = {opt for action in build_parser()._actions for opt in action.option_strings if opt.startswith("--")}
    assert sorted(parser_flags - names_in_rows()) == []


def _test_names(file: str) -> set[str]:
    tree = ast.parse((TESTS / file).read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


def test_every_effect_test_exists():
    missing = []
    for row in ROWS:
        assert row.effects, f"{row.names} has no test"
        for effect in row.effects:
            file, _, name = effect.partition("::")
            if not (TESTS / file).is_file() or name not in _test_names(file):
                missing.append(effect)
    assert not missing


@pytest.mark.parametrize("row", [r for r in ROWS if r.setting], ids=lambda r: r.names[0])
def test_each_flag_and_variable_sets_its_setting(row):
    assert getattr(parse_settings([], env=row.base_env), row.setting) != row.value  # else this could not fail
    if row.argv:
        assert getattr(parse_settings(list(row.argv), env=row.base_env), row.setting) == row.value
    if row.env:
        assert getattr(parse_settings([], env=row.base_env | row.env), row.setting) == row.value


# --------------------------------------------------------------------------- effects shown nowhere else


def test_home_holds_the_history_the_library_and_the_images(tmp_path, tiny_model_dir):
    from conftest import seed_home

    from masuka.studio import build_studio

    home = seed_home(tmp_path / "elsewhere" / "home", tiny_model_dir)
    studio = build_studio(parse_settings(["--home", str(home)], env={}))
    try:
        result = studio.runner.generate(studio.validate(prompt="a lighthouse", seed=1, steps=1))
        assert result.images[0].is_relative_to(home / "outputs")
        assert studio.lora_folder == home / "loras" and studio.lora_folder.is_dir()
    finally:
        studio.close()
    with sqlite3.connect(home / "masuka.db") as db:
        assert result.job_id in {row[0] for row in db.execute("SELECT job_id FROM jobs")}


def test_served_at_its_host_and_port_and_shared_by_a_tunnel(settings, monkeypatch):
    import gradio.networking
    import httpx

    from conftest import free_port
    from masuka.studio import build_studio
    from masuka.web.server import launch

    tunnels = []

    def tunnel(local_host, local_port, **kwargs):  # Gradio's share link, without the network
        tunnels.append((local_host, local_port))
        return "https://masuka-test.gradio.live"

    monkeypatch.setattr(gradio.networking, "setup_tunnel", tunnel)
    port = free_port()
    settings = replace(settings, host="127.0.0.2", port=port, share=True, auth=("ann", "a-long-enough-secret"))
    studio = build_studio(settings)
    demo, local_url, share_url = launch(settings, block=False, studio=studio, quiet=True)
    try:
        assert local_url.startswith(f"http://127.0.0.2:{port}")
        assert httpx.get(f"http://127.0.0.2:{port}/", timeout=30).status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=5)  # only the address asked for
        assert tunnels == [("127.0.0.2", port)] and share_url == "https://masuka-test.gradio.live"
    finally:
        demo.close()
        studio.close()


def test_device_places_the_pipeline_and_a_missing_gpu_is_refused(settings, monkeypatch):
    import torch

    from masuka.model import loading

    loaded = loading.load_pipeline(replace(settings, device="cpu"))
    assert {p.device.type for p in loaded.pipe.transformer.parameters()} == {"cpu"}

    def never(*args, **kwargs):
        raise AssertionError("weights were read before the refusal")

    monkeypatch.setattr(loading, "_read_pipeline", never)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU
    with pytest.raises(ValueError, match=r"device 'cuda:1' was asked for.*no CUDA GPU.*--device cpu"):
        loading.load_pipeline(replace(settings, device="cuda:1"))
    with pytest.raises(ValueError, match="device 'gpu' is not one of"):
        parse_settings(["--device", "gpu"], env={})


def test_the_library_takes_its_limits_from_the_settings(home, tmp_path, monkeypatch):
    from lora_factory import make_padded, make_peft_lora, make_tiny_transformer
    from lora_server import LoraServer

    from masuka.net import transfers
    from masuka.studio import build_studio

    lora = make_peft_lora(make_tiny_transformer(), tmp_path / "style.safetensors", seed=1)
    big = make_padded(lora, tmp_path / "big.safetensors", 1024**2)
    argv = ["--home", str(home), "--lora-max-mb", "1", "--download-timeout", "0.5", "--download-min-rate", "7"]
    paces = []
    real = transfers.download_url

    def spy(*args, **kwargs):  # the minimum rate is first checked after 30 s: see that it gets there
        paces.append((kwargs["min_rate"], kwargs["max_seconds"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(transfers, "download_url", spy)
    server = LoraServer()
    studio = build_studio(parse_settings(argv, env={"MASUKA_ALLOW_PRIVATE_URLS": "1"}))
    try:
        # MASUKA_ALLOW_PRIVATE_URLS: a loopback link is fetched.
        assert studio.add_lora_source(server.add("/style.safetensors", lora.read_bytes()), "style").state == "usable"
        assert paces == [(7 * 1024, 0.5)]
        # --lora-max-mb 1: a bigger file is refused, uploaded or linked.
        with pytest.raises(ValueError, match="size cap"):
            studio.add_lora_file(big, "big")
        with pytest.raises(ValueError, match="size cap"):
            studio.add_lora_source(server.add("/big.safetensors", big.read_bytes()), "big")
        # --download-timeout 0.5: a trickling link is given up.
        with pytest.raises(transfers.DownloadError, match=r"took longer than 0\.5 s"):
            studio.add_lora_source(server.add("/slow.safetensors", b"x" * 4096, chunk=1, delay=0.05), "slow")
        assert studio.lora_names() == ["style"]
    finally:
        studio.close()
    studio = build_studio(parse_settings(["--home", str(home)], env={}))
    try:
        with pytest.raises(ValueError, match="MASUKA_ALLOW_PRIVATE_URLS"):
            studio.add_lora_source(server.url("/style.safetensors"), "again")
    finally:
        studio.close()
        server.close()


def test_cache_settings_reach_fast_jobs(home):
    """--cache-threshold changes how many steps a fast job skips, --cache picks the method; exact jobs never
    consult the cache."""
    from diffusers.hooks import first_block_cache

    from masuka.studio import Caller, build_studio

    decisions: list[bool] = []
    original = first_block_cache.FBCHeadBlockHook._should_compute_remaining_blocks

    def counted(self, residual):
        decisions.append(original(self, residual))
        return decisions[-1]

    skipped = {}
    for argv in (["--cache-threshold", "0.05"], ["--cache", "first-block", "--cache-threshold", "0.35"]):
        studio = build_studio(parse_settings(argv + ["--home", str(home)], {}))
        try:
            first_block_cache.FBCHeadBlockHook._should_compute_remaining_blocks = counted
            decisions.clear()
            request = studio.validate(prompt="a lighthouse", seed=7, steps=12, speed="fast")
            record = studio.generate(request, Caller()).record
            skipped[argv[-1]] = decisions.count(False)
            assert len(decisions) == 12 and record["params"]["cache_threshold"] == float(argv[-1])
            decisions.clear()
            studio.generate(studio.validate(prompt="a lighthouse", seed=7, steps=12), Caller())
            assert decisions == []  # an exact job never consults the cache
        finally:
            first_block_cache.FBCHeadBlockHook._should_compute_remaining_blocks = original
            studio.close()
    assert skipped["0.35"] > skipped["0.05"]

    from diffusers.hooks import mag_cache

    steps: list[bool] = []
    mag_forward = mag_cache.MagCacheHeadHook.new_forward

    def mag_counted(self, module, *args, **kwargs):
        out = mag_forward(self, module, *args, **kwargs)
        steps.append(self.state_manager.get_state().should_compute)
        return out

    studio = build_studio(parse_settings(["--cache", "mag", "--home", str(home)], {}))
    try:
        mag_cache.MagCacheHeadHook.new_forward = mag_counted
        request = studio.validate(prompt="a lighthouse", seed=7, steps=12, speed="fast")
        record = studio.generate(request, Caller()).record
        assert (record["params"]["cache"], record["params"]["cache_threshold"]) == ("mag", 0.06)
        assert len(steps) == 12 and steps.count(False) > 0  # MagCache ran, and skipped
    finally:
        mag_cache.MagCacheHeadHook.new_forward = mag_forward
        studio.close()
