"""LoRA fast path: fuse LoRA deltas into the base weights in place, restore them bit-exactly.

Why: an unfused peft LoRA makes every generation ~30 % slower (extra matmuls in every
layer), while diffusers' own fuse/unfuse drifts the weights in bf16 (the original is
not recoverable).  Here a LoRA is fused as ``W' = round(W + delta)`` with ``delta``
computed in float32, and right away we compute what a restore would give,
``round(W' - delta)``, compare its bits with ``W`` and keep only the entries that
differ (a fraction of a percent, index + original bits).  A restore recomputes
``round(W' - delta)`` with the very same operations and patches those entries, so the
original weights come back bit for bit.  A checksum of the original bits, taken at
fuse time, verifies every restore.

Weights are written with ``weight.data.copy_``: the tensors keep their identity, so a
``torch.compile``'d graph sees new values without recompiling.

Three steps:

* :func:`build_plan` turns a LoRA state dict (any layout diffusers converts) into a
  model-independent :class:`FusePlan` of per-module factors (A, B, alpha/rank).  Plans
  are what the RAM cache keeps.
* :func:`resolve_targets` matches plans to the modules of a pipeline: a LoRA whose
  shapes do not fit is refused (:class:`LoraDoesNotFit`) before any weight is touched;
  anything the plan cannot express (bias/DoRA/norm keys, quantized or offloaded-to-meta
  layers, input-channel expansion) yields a ``fallback_reason`` so the caller uses
  diffusers' adapters instead.
* :func:`fuse` / :func:`restore` do the in-place work.  A failure during :func:`fuse`
  restores whatever was fused so far before re-raising, so there is never a half state.

Measured on an H200 (FLUX.1-dev-sized transformer, bf16, LoRAs on all 456 block linears,
11.8 B weights; the work is memory-bound): restore 0.096 s; switch (restore + fuse)
0.33 s rank 16, 0.42 s rank 64, 0.44 s rank 16 + rank 64; GPU memory after 30 switches
equal to after the first.  With weights on the CPU (model offload) and the work on the
GPU: about 0.25 s per GB of touched weights, each way.

What the restore fixes cost: 6 bytes per fixed element (int32 index + the bf16 bits).
The share of elements that need one follows the LoRA's strength (its change relative to
each weight), measured on CPU in bf16: about 0.5 / 1.3 / 3.1 / 7.7 % at 0.3 / 1 / 3 / 10 %
strength, i.e. 0.34 / 0.86 / 2.1 / 5.1 GiB for FLUX.1's 11.9 B touched weights (a change
as large as the weight itself needs about a third of them).  So the fixes are kept on the
GPU only within what is free for the job (`fix_budget_bytes`); the rest wait in CPU RAM,
and under model offload they live with the weights, in CPU RAM.

The delta is always computed at float32 "highest" matmul precision (no TF32), so a
restore recomputes the same bits as the fuse by construction.

torch and diffusers are imported lazily (nothing heavy at import time).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from masuka.lora.formats import LYCORIS_MARKERS, normalize_lora_keys

log = logging.getLogger(__name__)

COMPONENTS = ("transformer", "text_encoder")
_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>A|B)\.weight$")


class LoraDoesNotFit(ValueError):
    """The LoRA's shapes or module names do not match this model (nothing was changed)."""


class RestoreNotExact(RuntimeError):
    """A restore did not give back the original bits (the weights were changed behind our back)."""


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class LoraFactors:
    """One target module of one LoRA: delta = scaling * up @ down."""

    component: str  # "transformer" or "text_encoder"
    module: str  # module name inside the component
    down: Any  # torch.Tensor (rank, in_features), CPU
    up: Any  # torch.Tensor (out_features, rank), CPU
    scaling: float  # alpha / rank as peft would apply it (1.0 without alphas)


@dataclass(frozen=True)
class FusePlan:
    factors: tuple[LoraFactors, ...]
    fallback_reason: str | None = None  # why the fast path cannot express this LoRA

    @property
    def fusable(self) -> bool:
        return self.fallback_reason is None

    @property
    def nbytes(self) -> int:
        return sum(f.down.numel() * f.down.element_size() + f.up.numel() * f.up.element_size() for f in self.factors)


def _fallback(reason: str) -> FusePlan:
    return FusePlan(factors=(), fallback_reason=reason)


def build_plan(state_dict: Mapping[str, Any], *, pin: bool = False) -> FusePlan:
    """Convert a LoRA state dict (as read from its file) into a :class:`FusePlan`.

    Conversion is diffusers' own (``FluxPipeline.lora_state_dict``), so every layout it
    loads (PEFT/diffusers, kohya, ComfyUI, XLabs, ...) gives the same factors peft would
    hold, and ``scaling`` follows ``diffusers.utils.peft_utils.get_peft_kwargs``.  Raises
    what diffusers raises for a state dict it cannot convert (it could not load it
    either).  ``pin=True`` pins the factors (faster host-to-GPU copies).
    """
    from diffusers import FluxPipeline

    raw = normalize_lora_keys(state_dict)
    marker = next((k for k in raw if any(m in k for m in LYCORIS_MARKERS)), None)
    if marker is not None:
        return _fallback(f"LyCORIS key {marker}")
    converted, alphas = FluxPipeline.lora_state_dict(dict(raw), return_alphas=True)
    alphas = dict(alphas or {})
    factors: list[LoraFactors] = []
    for component in COMPONENTS:
        part = {k[len(component) + 1 :]: v for k, v in converted.items() if k.startswith(component + ".")}
        if not part:
            continue
        comp_alphas = {k[len(component) + 1 :]: v for k, v in alphas.items() if k.startswith(component + ".")}
        result = _component_factors(component, part, comp_alphas)
        if isinstance(result, str):
            return _fallback(result)
        factors.extend(result)
    leftover = [k for k in converted if not k.startswith(tuple(c + "." for c in COMPONENTS))]
    if leftover:
        # diffusers ignores these too (it only loads transformer./text_encoder. keys).
        log.info("LoRA keys outside the transformer and text encoder are ignored: %s", leftover[:3])
    if not factors:
        raise ValueError("no LoRA weights for the transformer or text encoder after conversion")
    return FusePlan(_packed(factors, pin))


def _packed(factors: list[LoraFactors], pin: bool) -> tuple[LoraFactors, ...]:
    """The same factors as views into one flat buffer (optionally pinned), so moving a
    whole LoRA to the GPU is one transfer instead of two per module."""
    import torch

    dtype = factors[0].down.dtype
    for f in factors:
        dtype = torch.promote_types(dtype, torch.promote_types(f.down.dtype, f.up.dtype))
    total = sum(f.down.numel() + f.up.numel() for f in factors)
    buffer = torch.empty(total, dtype=dtype, pin_memory=pin)
    packed, offset = [], 0
    for f in factors:
        views = []
        for t in (f.down, f.up):
            view = buffer[offset : offset + t.numel()].view(t.shape)
            view.copy_(t)
            views.append(view)
            offset += t.numel()
        packed.append(LoraFactors(f.component, f.module, views[0], views[1], f.scaling))
    return tuple(packed)


def _component_factors(component: str, part: dict[str, Any], alphas: dict[str, Any]) -> list[LoraFactors] | str:
    """Factors of one component, or the reason the fast path cannot express them."""
    import torch

    if component == "transformer":
        if "lora_A" not in next(iter(part)):
            from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

            part = convert_unet_state_dict_to_peft(part)
    else:
        if alphas:
            return "network alphas for the text encoder"
        from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

        part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in part.items():
        match = _FACTOR_KEY.match(key)
        if match is None:
            return f"{component} key {key} is not a lora_A/lora_B weight"
        pairs.setdefault(match["module"], {})[match["kind"]] = value
    ranks: dict[str, int] = {}
    for module, pair in pairs.items():
        down, up = pair.get("A"), pair.get("B")
        if down is None or up is None:
            return f"{component}.{module} has only one of lora_A/lora_B"
        if not (isinstance(down, torch.Tensor) and isinstance(up, torch.Tensor)):
            return f"{component}.{module} factors are not tensors"
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            return f"{component}.{module} factors are not a rank-r pair of matrices"
        if not (down.is_floating_point() and up.is_floating_point()):
            return f"{component}.{module} factors are not floating point"
        ranks[module] = int(up.shape[1])
    alpha_of = _alpha_rule(alphas)
    return [
        LoraFactors(
            component,
            module,
            pair["A"].detach().to("cpu").contiguous(),
            pair["B"].detach().to("cpu").contiguous(),
            (alpha_of(module) if alpha_of is not None else ranks[module]) / ranks[module],
        )
        for module, pair in pairs.items()
    ]


def _alpha_rule(alphas: dict[str, Any]):
    """module name -> alpha, as diffusers' get_peft_kwargs builds lora_alpha/alpha_pattern;
    None without network alphas (peft then uses alpha == rank: scaling 1)."""
    if not alphas:
        return None
    own = {k.split(".lora_A.")[0].replace(".alpha", ""): float(v) for k, v in alphas.items()}
    values = list(alphas.values())
    # Same expression as diffusers: tensors hash by identity, so the "most common" alpha
    # of a tensor-valued dict is its first one.
    default = float(collections.Counter(values).most_common()[0][0]) if len(set(values)) > 1 else float(values[0])
    return lambda module: own.get(module, default)


# --------------------------------------------------------------------------- resolving


@dataclass
class FuseTarget:
    """One module to change and the terms of its delta: sum(scale * up @ down)."""

    name: str  # component.module
    module: Any  # torch.nn.Linear
    terms: list[tuple[Any, Any, float]] = field(default_factory=list)  # (down, up, scale), CPU


@dataclass
class Resolution:
    targets: list[FuseTarget]
    fallback_reason: str | None = None


def pipeline_components(pipe: Any) -> dict[str, Any]:
    return {name: getattr(pipe, name, None) for name in COMPONENTS}


def _offload_reason(component: Any) -> str | None:
    try:
        from diffusers.hooks.group_offloading import _is_group_offload_enabled
    except ImportError:  # private helper; without it diffusers has no group offload to detect
        return None
    if _is_group_offload_enabled(component):
        return "group offloading keeps its own copies of the weights"
    return None


def _module_reason(name: str, module: Any) -> str | None:
    """Why this module cannot be fused in place (None when it can)."""
    import torch

    if not isinstance(module, torch.nn.Linear):
        return f"{name} is a {type(module).__name__}, not a plain nn.Linear"
    weight = module.weight
    if type(weight) is not torch.nn.Parameter or type(weight.data) is not torch.Tensor:
        return f"{name} has a quantized or wrapped weight ({type(weight).__name__})"
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"{name} weight has dtype {weight.dtype}"
    if weight.device.type == "meta":
        return f"{name} weight is offloaded (meta device)"
    return None


def resolve_targets(
    components: Mapping[str, Any], plans: Sequence[tuple[FusePlan, float]]
) -> Resolution:
    """Match ``(plan, user scale)`` pairs to modules; one target per module, terms in the
    order given.  Raises :class:`LoraDoesNotFit` for a module the model lacks or whose
    shape differs; returns a ``fallback_reason`` for what only diffusers can apply."""
    for plan, _scale in plans:
        if not plan.fusable:
            return Resolution([], plan.fallback_reason)
    targets: dict[str, FuseTarget] = {}
    named: dict[str, dict[str, Any]] = {}
    for plan, scale in plans:
        for f in plan.factors:
            component = components.get(f.component)
            if component is None:
                raise LoraDoesNotFit(f"LoRA does not fit this model: it has weights for a {f.component} it lacks")
            if f.component not in named:
                reason = _offload_reason(component)
                if reason:
                    return Resolution([], reason)
                named[f.component] = dict(component.named_modules())
            modules = named[f.component]
            name = f.module
            if name not in modules and f.component == "text_encoder" and name.startswith("text_model."):
                name = name[len("text_model.") :]  # flattened CLIPTextModel (see diffusers lora_base)
            module = modules.get(name)
            full = f"{f.component}.{name}"
            while module is not None and hasattr(module, "base_layer"):
                # A peft adapter wraps this layer now (the caller unloads it before fusing;
                # unloading puts this very base layer back).
                module = module.base_layer
            if module is None:
                raise LoraDoesNotFit(f"LoRA does not fit this model: it targets {full}, which this model does not have")
            reason = _module_reason(full, module)
            if reason:
                return Resolution([], reason)
            out_f, in_f = module.weight.shape
            lora_out, lora_in = f.up.shape[0], f.down.shape[1]
            if (lora_out, lora_in) != (out_f, in_f):
                if lora_out == out_f and lora_in > in_f:
                    return Resolution([], f"LoRA expands the input channels of {full}")
                raise LoraDoesNotFit(
                    f"LoRA shapes do not fit this model: {full} is {out_f}x{in_f}, LoRA has {lora_out}x{lora_in}"
                )
            target = targets.setdefault(full, FuseTarget(full, module))
            target.terms.append((f.down, f.up, float(scale) * f.scaling))
    return Resolution(list(targets.values()))


# --------------------------------------------------------------------------- fuse / restore


@dataclass
class _FusedModule:
    name: str
    module: Any
    terms: list[tuple[Any, Any, float]]
    device: Any  # where the delta was computed (a restore computes it there again)
    fix_index: Any  # flat indices (int32/int64) whose round trip is off by rounding
    fix_value: Any  # their original bits (int view)
    checksum: Any  # int64 sum of the original bits (0-d tensor) or None


@dataclass
class FusedState:
    modules: list[_FusedModule] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.modules

    @property
    def fix_entries(self) -> int:
        return sum(m.fix_index.numel() for m in self.modules)

    def tensors(self) -> Iterator[Any]:
        """Tensors this state keeps alive on its own (the CPU factors belong to the plans)."""
        for m in self.modules:
            yield m.fix_index
            yield m.fix_value
            if m.checksum is not None:
                yield m.checksum

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


_INT_OF_SIZE = {2: "int16", 4: "int32", 8: "int64"}


def _lanes(t: Any, lane_bytes: int) -> Any:
    """A contiguous tensor's bits as a flat integer tensor, ``lane_bytes`` per entry when
    its size allows (else one entry per element)."""
    import torch

    size = max(lane_bytes, t.element_size())
    if (t.numel() * t.element_size()) % size:
        size = t.element_size()
    return t.reshape(-1).view(getattr(torch, _INT_OF_SIZE[size]))


def _checksum(t: Any) -> Any:
    """Wrapping int64 sum of the bits (8-byte lanes: one fast pass)."""
    import torch

    return _lanes(t, 8).sum(dtype=torch.int64)


class _Staging:
    """Device copies of the CPU buffers behind LoRA factors, one transfer per buffer for
    the length of one fuse() or restore() call."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, Any], Any] = {}

    def on(self, t: Any, device: Any) -> Any:
        if t.device == device:
            return t
        base = t._base if t._base is not None else t
        if base.dim() != 1 or not base.is_contiguous():
            return t.to(device, non_blocking=True)
        key = (base.data_ptr(), device)
        copy = self._buffers.get(key)
        if copy is None:
            copy = self._buffers[key] = base.to(device, non_blocking=True)
        return copy.as_strided(t.size(), t.stride(), t.storage_offset() - base.storage_offset())


@contextlib.contextmanager
def _exact_matmul() -> Iterator[None]:
    """float32 matmuls at full precision (no TF32) for the length of a fuse or restore, so the
    two compute the same delta whatever the rest of the process set.  The runner never
    generates while it fuses or restores, so the switch is not seen by a job."""
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def fix_budget_bytes(device: Any, reserve_bytes: int) -> int:
    """GPU bytes the restore fixes of a fuse may take: what is free for this job.

    Free = what the driver reports free plus what PyTorch holds reserved but unused, less
    ``reserve_bytes`` (the job's own activation peak, from the memory plan); never below 0.
    """
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(0, int(free + cached - reserve_bytes))


def fix_home(weight_device: Any, compute_device: Any) -> Any:
    """Where a module's fixes live: with the weight (CPU RAM under model offload), else where
    the work happened."""
    import torch

    weight_device, compute_device = torch.device(weight_device), torch.device(compute_device)
    return weight_device if weight_device.type != compute_device.type else compute_device


def _delta(terms: Sequence[tuple[Any, Any, float]], device: Any, staging: _Staging) -> Any:
    """sum(scale * up @ down) in float32 on ``device``.  Deterministic: a restore rebuilds
    the very same tensor the fuse used (both run under `_exact_matmul`)."""
    import torch

    downs = [staging.on(d, device).to(torch.float32) for d, _, _ in terms]
    ups = [staging.on(u, device).to(torch.float32) * s for _, u, s in terms]
    if len(terms) == 1:
        return torch.mm(ups[0], downs[0])
    # One matmul over the concatenated ranks: the sum happens inside it.
    return torch.mm(torch.cat(ups, dim=1), torch.cat(downs, dim=0))


# The mixed-dtype add/sub compute in float32 and round once into the weight's dtype
# (exactly (W.float() +- delta).to(dtype)) in one kernel, without float32 copies of W.


def _fuse_one(
    target: FuseTarget, compute_device: Any, verify: bool, staging: _Staging, budget: "_FixBudget | None" = None
) -> _FusedModule:
    import torch

    weight = target.module.weight
    device = torch.device(compute_device) if compute_device is not None else weight.device
    original = weight.detach().to(device).contiguous()  # the weight itself when already there
    delta = _delta(target.terms, device, staging)
    checksum = _checksum(original) if verify else None
    fused = torch.add(original, delta, out=torch.empty_like(original))
    back = torch.sub(fused, delta, out=torch.empty_like(original))  # what a restore computes
    del delta
    # Element-wise (8-byte lanes measured no faster on an H200 and need twice the memory).
    original_bits = _lanes(original, original.element_size())
    wrong = (_lanes(back, back.element_size()) != original_bits).nonzero().squeeze(1)
    del back
    index = wrong.to(torch.int32) if original_bits.numel() < 2**31 else wrong
    value = original_bits[wrong]
    home = fix_home(weight.device, device)
    if home != device:  # offloaded weights: the fixes wait beside them, in CPU RAM
        index, value = index.to(home), value.to(home)
    elif budget is not None and device.type == "cuda":
        index, value = budget.place(index, value)
    weight.data.copy_(fused)
    return _FusedModule(target.name, target.module, target.terms, device, index, value, checksum)


@dataclass
class _FixBudget:
    """Keeps the restore fixes on the GPU up to ``gpu_bytes``; past that they go to CPU RAM.

    How many fixes a LoRA needs grows with how strongly it changes the weights (about 1 %
    of the touched elements for a change of 1 % of a weight, 33 % for a change as large as
    the weight), so a strong LoRA must not be able to take the GPU memory a job needs.
    A restore moves CPU-held fixes back (one copy per module), which costs time, not memory.
    """

    gpu_bytes: int
    used: int = 0
    spilled: int = 0

    def place(self, index: Any, value: Any) -> tuple[Any, Any]:
        size = index.numel() * index.element_size() + value.numel() * value.element_size()
        if self.used + size <= self.gpu_bytes:
            self.used += size
            return index, value
        self.spilled += size
        return index.cpu(), value.cpu()


def fuse(
    targets: Iterable[FuseTarget],
    *,
    compute_device: Any = None,
    verify: bool = True,
    fix_gpu_bytes: int | None = None,
) -> FusedState:
    """Fuse every target in place.  ``compute_device`` (e.g. the GPU while the weights
    sit on the CPU under model offload) is where the float32 work happens; default: the
    weight's own device.  On any exception the modules already fused are restored
    exactly and the exception propagates."""
    import torch

    state = FusedState()
    staging = _Staging()
    budget = _FixBudget(fix_gpu_bytes) if fix_gpu_bytes is not None else None
    try:
        with torch.no_grad(), _exact_matmul():
            for target in targets:
                state.modules.append(_fuse_one(target, compute_device, verify, staging, budget))
        if budget is not None and budget.spilled:
            log.info(
                "LoRA restore fixes: %.0f MiB on the GPU, %.0f MiB in CPU RAM (GPU budget %.0f MiB)",
                budget.used / 2**20, budget.spilled / 2**20, budget.gpu_bytes / 2**20,
            )
    except BaseException:
        log.warning("LoRA fuse failed after %d modules; restoring them", len(state.modules))
        restore(state)
        raise
    return state


def _restore_one(m: _FusedModule, staging: _Staging) -> Any:
    import torch

    data = m.module.weight.data
    work = data.to(m.device).contiguous()  # the weight itself when already there: restored in place
    torch.sub(work, _delta(m.terms, m.device, staging), out=work)
    if m.fix_index.numel():
        _lanes(work, work.element_size())[m.fix_index.to(m.device, torch.int64)] = m.fix_value.to(m.device)
    checksum = _checksum(work) if m.checksum is not None else None
    if work.data_ptr() != data.data_ptr():
        data.copy_(work)
    return checksum


def restore(state: FusedState) -> None:
    """Put back the original weights of every fused module (bit-exact) and drop the state's
    tensors.  Raises :class:`RestoreNotExact` (after restoring everything) when a module's
    bits differ from the checksum taken at fuse time."""
    import torch

    expected, got, names = [], [], []
    staging = _Staging()
    with torch.no_grad(), _exact_matmul():
        for m in reversed(state.modules):
            checksum = _restore_one(m, staging)
            if checksum is not None:
                expected.append(m.checksum)
                got.append(checksum)
                names.append(m.name)
    state.modules.clear()
    if expected:
        where = expected[0].device  # one comparison, one device sync for all modules
        expected_t = torch.stack([c.to(where) for c in expected])
        got_t = torch.stack([c.to(where) for c in got])
        bad = (expected_t != got_t).nonzero().flatten().tolist()
        if bad:
            raise RestoreNotExact(f"{len(bad)} module(s) did not restore exactly, e.g. {names[bad[0]]}")
