"""LoRAs already read, kept in CPU RAM (size-capped, least recently used out).

Two kinds of entries share one byte cap: raw state dicts (for diffusers' adapter path)
and converted fast-path plans (``masuka.core.fastlora.FusePlan``: factors ready to fuse).
Switching back to a LoRA used earlier in the session then skips the disk read, the
safetensors parse and the format conversion.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any, Callable

from masuka.lora.formats import load_lora_state_dict

log = logging.getLogger(__name__)


def state_dict_bytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class LoraStateCache:
    def __init__(self, max_bytes: int = 2 * 1024**3):
        self.max_bytes = max_bytes
        # (kind, sha256) -> (value, bytes); kind is "raw" or "plan".
        self._items: OrderedDict[tuple[str, str], tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._items.values())

    def get(self, lora) -> dict[str, Any]:
        """A fresh dict (diffusers pops keys from what it is given) of the LoRA's tensors."""
        key = ("raw", lora.sha256)
        item = self._lookup(key)
        if item is not None:
            return dict(item)
        self.misses += 1
        # Verified read with keys normalised, so diffusers never silently skips unprefixed keys.
        state = load_lora_state_dict(lora.path)
        self._store(key, state, state_dict_bytes(state))
        return dict(state)

    def get_plan(self, lora, build: Callable[[dict[str, Any]], Any]) -> Any:
        """The LoRA's converted fast-path plan (``build(state_dict)``, which has ``nbytes``);
        cached instead of the raw dict, so a LoRA used before needs no read nor conversion."""
        key = ("plan", lora.sha256)
        plan = self._lookup(key)
        if plan is not None:
            return plan
        self.misses += 1
        plan = build(load_lora_state_dict(lora.path))
        self._store(key, plan, plan.nbytes)
        return plan

    def _lookup(self, key: tuple[str, str]) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def _store(self, key: tuple[str, str], value: Any, size: int) -> None:
        if size > self.max_bytes:
            return
        with self._lock:
            self._items[key] = (value, size)
            self._items.move_to_end(key)
            total = sum(s for _, s in self._items.values())
            while total > self.max_bytes and len(self._items) > 1:
                (kind, old_sha), (_, old_size) = self._items.popitem(last=False)
                total -= old_size
                log.debug("LoRA cache evicted %s %s (%d bytes)", kind, old_sha[:12], old_size)

    def forget(self, sha256: str, kinds: tuple[str, ...] = ("raw", "plan")) -> None:
        with self._lock:
            for kind in kinds:
                self._items.pop((kind, sha256), None)
