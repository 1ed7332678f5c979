"""MASUKA: start the studio.  `python app.py --help` lists every flag."""

from __future__ import annotations

import logging
import sys


def plan_report(settings) -> str:
    """What --plan prints: the memory plan of --model on this machine or a named GPU. Reads no weight."""
    from masuka.model import memory, plan
    from masuka.model.loading import FLUX_DEV, FLUX_SCHNELL, describe_model, resolve_model_spec
    from masuka.settings import TINY_MODEL_ID, resolve_device_dtype

    if settings.plan == "this":
        device, torch_dtype = resolve_device_dtype(settings.device, settings.dtype)
        mem = memory.detect_memory(device)
        gpu, ram, dtype = mem.gpu_spec(), mem.ram_total, plan.dtype_name(torch_dtype)
        bnb, gguf = memory.bitsandbytes_available(), memory.gguf_available()
        where = (f"this machine: {gpu.label}, {plan.gib(gpu.total_bytes)} of GPU memory, compute capability "
                 f"{gpu.capability[0]}.{gpu.capability[1]}" if gpu else
                 f"this machine: no CUDA GPU (device {device}), so everything would run on the CPU in {dtype}")
        where += f"; {plan.gib(ram)} of RAM; bitsandbytes {'installed' if bnb else 'not installed'}, " \
                 f"gguf {'installed' if gguf else 'not installed'}"
    else:
        gpu = plan.gpu_spec(settings.plan)
        ram, bnb, gguf = gpu.ram_bytes, True, True
        dtype = gpu.dtype if settings.dtype == "auto" else plan.dtype_name(settings.dtype)
        where = (f"{gpu.label}: {plan.gib(gpu.total_bytes)} of GPU memory as torch reports it, compute capability "
                 f"{gpu.capability[0]}.{gpu.capability[1]} ({dtype}); RAM {plan.gib(ram)} ({gpu.ram_source}); "
                 "bitsandbytes and gguf assumed installed (requirements-gpu.txt, as the Colab notebook does)")
    parts = [f"MASUKA memory plan for {where}. Figures are predictions (masuka/model/plan.py), not measurements."]
    if settings.fp8 and (gpu is None or tuple(gpu.capability) < (8, 9)):
        parts.append("--fp8 would be refused here: it needs a GPU of compute capability 8.9+ (L4, H100); the plan "
                     "below shows its sizes anyway.")
    if settings.model == TINY_MODEL_ID:
        parts.append("The built-in demo model needs a few MB and fits anywhere; these are the FLUX.1 models "
                     "(--model names another).")
        models = [plan.hub_model(FLUX_DEV), plan.hub_model(FLUX_SCHNELL)]
    else:
        models = [describe_model(resolve_model_spec(settings.model, settings.paths.models, settings.base_model))]
    for model in models:
        parts.append(f"## {model.name}\n\n" + plan.render_choice(model, gpu, ram, dtype=dtype, bnb=bnb, gguf=gguf,
                                                               profile=settings.memory, fp8=settings.fp8))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    from masuka.web.server import ShareWithoutPassword, check_served_folder, check_share_policy, launch
    from masuka.settings import parse_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = parse_settings(argv)
        if settings.plan:
            # The plan is this command's output (stdout), not a log line; nothing is loaded or served.
            sys.stdout.write(plan_report(settings))
            return 0
        check_share_policy(settings)  # before any model loads or tunnel opens
        check_served_folder(settings)
    except (ValueError, ShareWithoutPassword) as exc:
        logging.getLogger("masuka").error("%s", exc)
        return 2
    launch(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
