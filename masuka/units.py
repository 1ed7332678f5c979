"""Quantities shown to people."""

from __future__ import annotations

MiB = 2**20
GiB = 2**30


def human_bytes(n: int) -> str:
    """A size for messages: "1.5 GiB (1610612736 bytes)", "2.0 MiB (2097152 bytes)", "512 bytes"."""
    if n >= GiB:
        return f"{n / GiB:.1f} GiB ({n} bytes)"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB ({n} bytes)"
    return f"{n} bytes"
