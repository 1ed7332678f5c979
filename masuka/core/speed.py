"""The per-job speed choice: `exact` (the plain pipeline) or `fast` (step caching).

`fast` turns on a diffusers step cache on the transformer for one job. first-block
(First Block Cache): at each step the first block runs, and when its output residual
changed less than the threshold (relative mean absolute difference) since the last full
step, the other blocks are skipped and their cached residual reused. mag (MagCache):
steps are skipped while the accumulated error predicted from FLUX's calibrated
magnitude ratios stays under the threshold. The cache is switched on just
before the job and off in a `finally`, so the model is never reloaded and the next
`exact` job runs the untouched pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

from masuka.settings import CACHE_DEFAULT_THRESHOLDS, CACHE_METHODS, DEFAULT_CACHE_THRESHOLD

SPEEDS = ("exact", "fast")
CACHE_THRESHOLD_MIN, CACHE_THRESHOLD_MAX = 0.0, 1.0


def check_speed(value: Any) -> str:
    """`"exact"` or `"fast"` (None means exact); a ValueError names `speed` and the allowed values."""
    if value is None:
        return "exact"
    if isinstance(value, str) and value.strip().lower() in SPEEDS:
        return value.strip().lower()
    shown = repr(value) if isinstance(value, str) and len(value) <= 40 else f"a {type(value).__name__}"
    raise ValueError(f"speed must be one of {', '.join(SPEEDS)}, got {shown}")


@dataclass(frozen=True)
class StepCache:
    """How a `fast` job caches steps (from --cache / --cache-threshold)."""

    method: str = CACHE_METHODS[0]
    threshold: float = DEFAULT_CACHE_THRESHOLD

    def __post_init__(self) -> None:
        if self.method not in CACHE_METHODS:
            raise ValueError(f"cache method {self.method!r} is not one of {', '.join(CACHE_METHODS)}")
        if not CACHE_THRESHOLD_MIN < self.threshold <= CACHE_THRESHOLD_MAX:
            raise ValueError(
                f"cache threshold must be above {CACHE_THRESHOLD_MIN:g} and at most {CACHE_THRESHOLD_MAX:g}, "
                f"got {self.threshold:g}"
            )

    @classmethod
    def from_settings(cls, method: str, threshold: float | None) -> "StepCache":
        return cls(method, CACHE_DEFAULT_THRESHOLDS[method] if threshold is None else threshold)

    def config(self, steps: int) -> Any:
        if self.method == "mag":
            from diffusers.hooks import MagCacheConfig
            from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

            # The ratios are FLUX's, calibrated at 28 steps; diffusers interpolates them to `steps`.
            return MagCacheConfig(threshold=self.threshold, num_inference_steps=steps, mag_ratios=FLUX_MAG_RATIOS)
        from diffusers.hooks import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=self.threshold)

    def params(self) -> dict[str, Any]:
        """What a fast job's record and image metadata say about the cache."""
        return {"cache": self.method, "cache_threshold": self.threshold}


@contextmanager
def step_cache(transformer: Any, cache: StepCache | None, steps: int) -> Iterator[None]:
    """The cache on `transformer` for a `steps`-step image (None: nothing changes); always off again after."""
    if cache is None:
        yield
        return
    transformer.enable_cache(cache.config(steps))
    try:
        yield
    finally:
        transformer.disable_cache()
