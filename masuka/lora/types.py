"""What the rest of the studio knows about a LoRA: its name rules, a resolved file, and the errors.

The runner depends on this module only (through `LoraResolver`), never on the library,
so the library can be swapped (another folder, a remote catalogue) without touching it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")


class LoraNotUsable(ValueError):
    """A LoRA that exists but cannot be used with this model (the message says why)."""


class LoraInUse(ValueError):
    """Deleting a LoRA that a running job uses."""


def validate_name(name: Any, what: str = "LoRA name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise ValueError(
            f"{what} {name!r} is not allowed: use 1-100 letters, digits, '.', '_' or '-' "
            "(not starting with '.')"
        )
    return name


@dataclass(frozen=True)
class ResolvedLora:
    """A usable LoRA: its name, the absolute path of its file, and the file's sha256."""

    name: str
    path: Path
    sha256: str


class LoraResolver(Protocol):
    """What the runner needs of a LoRA library."""

    def resolve(self, name: str) -> ResolvedLora: ...

    def get(self, name: str) -> Any: ...

    def delete(self, name: str) -> Any: ...
