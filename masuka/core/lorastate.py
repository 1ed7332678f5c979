"""The LoRA set a pipeline holds, and the one way to change it.

A small state machine with three states (`Strategy`): no LoRA, LoRAs fused into the
weights (the fast path, exact restore: see `masuka.core.fastlora`), or LoRAs held as
diffusers/peft adapters (for what the fast path cannot express).  Every change goes
through `apply`; a failure anywhere leaves the pipeline with no LoRA, never half a set.

The runner owns one `LoraState` and calls it only from its worker (one job at a time),
so nothing here takes a lock.
"""

from __future__ import annotations

import enum
import logging
import re
from typing import Any

from masuka.core import fastlora
from masuka.core.requests import LoraChoice
from masuka.lora.cache import LoraStateCache
from masuka.lora.types import LoraResolver, ResolvedLora
from masuka.model.compiled import is_compiled

log = logging.getLogger(__name__)


class NeedsEagerModel(ValueError):
    """A LoRA only peft adapters can apply, refused while the transformer is compiled."""


FP8_FALLBACK = "the transformer's weights are float8 (--fp8): fusing into them is not exact"


class Strategy(str, enum.Enum):
    NONE = "none"
    FUSED = "fused"
    ADAPTERS = "adapters"


def adapter_name(lora: ResolvedLora) -> str:
    # peft keeps adapters in ModuleDicts, whose keys may not contain '.'.
    return "m_" + re.sub(r"[^A-Za-z0-9_]", "_", lora.name) + "_" + lora.sha256[:8]


Wanted = dict[str, tuple[ResolvedLora, float]]  # adapter name -> (lora, scale)


class LoraState:
    def __init__(self, pipe: Any, resolver: LoraResolver, cache: LoraStateCache, device: Any, *, fp8: bool = False):
        self._pipe = pipe
        # --fp8: fusing a LoRA into float8 weights rounds it away and could not be restored bit-exactly,
        # so every LoRA goes through peft adapters beside the float8 weights (quality and speed not measured here).
        self._fp8 = fp8
        self._resolver = resolver
        self._cache = cache
        self._device = device
        self._held: Wanted = {}
        self._strategy = Strategy.NONE
        self._fused: fastlora.FusedState | None = None
        self._fallback_reason: str | None = None
        self.inexact_restores = 0  # fused restores whose checksum failed (must stay 0)

    # ---- views -------------------------------------------------------------
    @property
    def strategy(self) -> Strategy:
        return self._strategy if self._held else Strategy.NONE

    def held(self) -> list[dict[str, Any]]:
        return [{"name": lora.name, "scale": scale} for lora, scale in self._held.values()]

    def status(self) -> dict[str, Any]:
        fused = self._fused
        return {
            "strategy": self.strategy.value,
            "loras": self.held(),
            "fused_modules": len(fused.modules) if fused else 0,
            "restore_entries": fused.fix_entries if fused else 0,
            "restore_bytes": fused.nbytes() if fused else 0,
            "fallback_reason": self._fallback_reason,
            "inexact_restores": self.inexact_restores,
            "cache_bytes": self._cache.used_bytes,
        }

    # ---- the one transition ------------------------------------------------
    def apply(self, choices: tuple[LoraChoice, ...], *, reserve_bytes: int = 0) -> None:
        """Make the pipeline hold exactly the requested LoRAs at the requested scales.

        Fast path first; a LoRA it cannot express sends the whole set through adapters.
        A LoRA that does not fit is refused before any weight changes.  ``reserve_bytes``
        is the GPU memory the coming job needs beside the weights (its activation peak):
        restore fixes never take it.
        """
        wanted: Wanted = {}
        for choice in choices:
            lora = self._resolver.resolve(choice.name)
            wanted[adapter_name(lora)] = (lora, choice.scale)
        # A fixed order: the same set at the same scales always fuses to the same bits.
        wanted = dict(sorted(wanted.items()))
        if wanted == self._held:
            return
        if not wanted:
            self.clear()
            return
        resolution = self._resolve_fast(wanted)  # may refuse; nothing is touched yet
        if self._fp8 and resolution.fallback_reason is None:
            resolution = fastlora.Resolution([], FP8_FALLBACK)
        if resolution.fallback_reason is not None:
            self._refuse_if_compiled(wanted, resolution.fallback_reason)  # nothing is touched yet
        self._fallback_reason = resolution.fallback_reason
        if resolution.fallback_reason is not None:
            log.info("LoRA fast path not used (%s): diffusers adapters", resolution.fallback_reason)
            for lora, _scale in wanted.values():  # no pinned plan is kept for what is never fused
                self._cache.forget(lora.sha256, kinds=("plan",))
            self._apply_adapters(wanted)
            return
        self.clear()
        try:
            # fuse() restores what it fused so far before an exception leaves it.
            self._fused = fastlora.fuse(
                resolution.targets,
                compute_device=self._fuse_device(),
                fix_gpu_bytes=self._fix_gpu_budget(reserve_bytes),
            )
        except Exception:
            log.warning("LoRA fuse failed; the pipeline holds no LoRA")
            raise
        self._held, self._strategy = dict(wanted), Strategy.FUSED

    def clear(self) -> None:
        """Back to the original weights: restore what is fused, unload adapters."""
        fused, self._fused = self._fused, None
        try:
            if fused is not None:
                try:
                    fastlora.restore(fused)
                except fastlora.RestoreNotExact as exc:
                    # Cannot happen unless the weights were changed behind our back; the
                    # images stay correct to rounding, so say it loudly and keep serving.
                    self.inexact_restores += 1
                    log.error("LoRA restore was not bit-exact: %s", exc)
            if self._strategy is Strategy.ADAPTERS and self._held:
                self._pipe.unload_lora_weights()
        finally:
            self._held, self._strategy = {}, Strategy.NONE

    # ---- internals -----------------------------------------------------------
    def _resolve_fast(self, wanted: Wanted) -> fastlora.Resolution:
        plans = [(self._cached_plan(lora), scale) for lora, scale in wanted.values()]
        return fastlora.resolve_targets(fastlora.pipeline_components(self._pipe), plans)

    def _build_plan(self, state: dict[str, Any]) -> fastlora.FusePlan:
        try:
            return fastlora.build_plan(state, pin=self._fuse_device() is not None)
        except Exception as exc:  # diffusers' adapter path gives the real error, if any
            log.warning("LoRA fast-path conversion failed (%s: %s)", type(exc).__name__, exc)
            return fastlora.FusePlan((), f"conversion failed: {type(exc).__name__}")

    def _refuse_if_compiled(self, wanted: Wanted, reason: str) -> None:
        """Under --compile only fused LoRAs are served: peft adapters would change the compiled
        blocks (a recompile per change, and peft's hotswap cannot take what the fast path
        cannot fuse either: LyCORIS/LoKr, DoRA, bias or norm keys, widened layers)."""
        transformer = getattr(self._pipe, "transformer", None)
        if transformer is None or not is_compiled(transformer):
            return
        culprits = [lora.name for lora, _ in wanted.values() if not self._cached_plan(lora).fusable]
        names = ", ".join(repr(n) for n in (culprits or [lora.name for lora, _ in wanted.values()]))
        raise NeedsEagerModel(
            f"LoRA {names} cannot be used while the model is compiled (--compile): the fast path cannot "
            f"fuse it ({reason}), and loading it as an adapter would recompile the model; start the app "
            "without --compile to use it"
        )

    def _cached_plan(self, lora: ResolvedLora) -> fastlora.FusePlan:
        return self._cache.get_plan(lora, self._build_plan)

    def _fix_gpu_budget(self, reserve_bytes: int) -> int | None:
        """GPU bytes the exact-restore fixes may hold: what is free for this job (the rest waits in CPU RAM)."""
        device = self._fuse_device()
        if device is None:
            return None
        return fastlora.fix_budget_bytes(device, reserve_bytes)

    def _fuse_device(self) -> Any:
        """The GPU when there is one (weights offloaded to the CPU are fused there too)."""
        device = self._device
        return device if getattr(device, "type", str(device)) == "cuda" else None

    def _apply_adapters(self, wanted: Wanted) -> None:
        pipe = self._pipe
        if self._strategy is not Strategy.ADAPTERS:
            self.clear()
        stale = [name for name in self._held if name not in wanted]
        try:
            if stale:
                if len(stale) == len(self._held):
                    # Nothing we keep: unload restores the original modules exactly.
                    pipe.unload_lora_weights()
                else:
                    pipe.delete_adapters(stale)
                for name in stale:
                    del self._held[name]
            self._strategy = Strategy.ADAPTERS
            for name, (lora, scale) in wanted.items():
                if name not in self._held:
                    pipe.load_lora_weights(self._cache.get(lora), adapter_name=name)
                    self._held[name] = (lora, scale)
            pipe.set_adapters(list(wanted), [scale for _, scale in wanted.values()])
            self._held = dict(wanted)
        except Exception:
            # A half-loaded adapter must never linger: back to no LoRA at all.
            log.warning("LoRA load failed; unloading every adapter")
            self._unload_all()
            raise
        active = set(pipe.get_active_adapters()) if hasattr(pipe, "get_active_adapters") else set(wanted)
        if active != set(wanted):
            self._unload_all()
            raise RuntimeError(f"adapters {sorted(active)} are active, expected {sorted(wanted)}")

    def _unload_all(self) -> None:
        try:
            self._pipe.unload_lora_weights()
        finally:
            self._held, self._strategy = {}, Strategy.NONE
