"""LoRA state dicts already read, kept in CPU RAM (size-capped, least recently used out).

Switching back to a LoRA used earlier in the session then skips the disk read
and the safetensors parse.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

log = logging.getLogger(__name__)


def state_dict_bytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class LoraStateCache:
    def __init__(self, max_bytes: int = 2 * 1024**3):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[dict[str, Any], int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._items.values())

    def get(self, lora) -> dict[str, Any]:
        """A fresh dict (diffusers pops keys from what it is given) of the LoRA's tensors."""
        from .lora_formats import load_lora_state_dict

        key = lora.sha256
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return dict(item[0])
        self.misses += 1
        # Verified read with keys normalised, so diffusers never silently skips unprefixed keys.
        state = load_lora_state_dict(lora.file)
        size = state_dict_bytes(state)
        if size <= self.max_bytes:
            with self._lock:
                self._items[key] = (state, size)
                total = sum(s for _, s in self._items.values())
                while total > self.max_bytes and len(self._items) > 1:
                    old_key, (_, old_size) = self._items.popitem(last=False)
                    total -= old_size
                    log.debug("LoRA cache evicted %s (%d bytes)", old_key[:12], old_size)
        return dict(state)

    def forget(self, sha256: str) -> None:
        with self._lock:
            self._items.pop(sha256, None)
