"""What `None` means for each generation parameter, per model family."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDefaults:
    width: int = 1024
    height: int = 1024
    steps: int = 28
    guidance: float = 3.5
    max_sequence_length: int = 512


TINY_DEFAULTS = ModelDefaults(width=256, height=256, steps=4, guidance=3.5, max_sequence_length=512)
SCHNELL_DEFAULTS = ModelDefaults(width=1024, height=1024, steps=4, guidance=0.0, max_sequence_length=256)
DEV_DEFAULTS = ModelDefaults(width=1024, height=1024, steps=28, guidance=3.5, max_sequence_length=512)
