"""Memory accounting: bytes by device and tier and category, against a budget.

The kernel reserves before it allocates, so the device never runs out of memory: an allocation
that does not fit is refused here first and the caller evicts, waits or fails cleanly.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

CATEGORIES = ("weights", "kv", "workspace")


class MemoryAccounting:
    """Device bytes by category under ``budget_bytes``, and bytes held in each host tier."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._device: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self._tiers: dict[str, int] = defaultdict(int)
        self._peak = 0
        self._lock = threading.Lock()

    @property
    def device_used(self) -> int:
        """Device bytes reserved in all categories."""
        return sum(self._device.values())

    def free_bytes(self) -> int:
        """Device bytes still available under the budget."""
        with self._lock:
            return self.budget_bytes - self.device_used

    def try_reserve(self, category: str, nbytes: int) -> bool:
        """Reserve ``nbytes`` of device memory if they fit; False (nothing changed) otherwise."""
        if category not in self._device:
            raise ValueError(f"unknown category {category!r}; one of {CATEGORIES}")
        with self._lock:
            if self.device_used + nbytes > self.budget_bytes:
                return False
            self._device[category] += nbytes
            self._peak = max(self._peak, self.device_used)
            return True

    def release(self, category: str, nbytes: int) -> None:
        """Return device bytes reserved earlier."""
        with self._lock:
            if nbytes > self._device[category]:
                raise ValueError(f"releasing {nbytes} {category} bytes but only {self._device[category]} are held")
            self._device[category] -= nbytes

    def tier_add(self, tier: str, nbytes: int) -> None:
        """Count bytes stored in a host tier (negative to remove)."""
        with self._lock:
            self._tiers[tier] += nbytes
            if self._tiers[tier] < 0:
                raise ValueError(f"tier {tier!r} accounting went negative")

    def device_bytes(self, category: str) -> int:
        """Device bytes held in one category."""
        with self._lock:
            return self._device[category]

    def tier_bytes(self, tier: str) -> int:
        """Bytes held in one tier."""
        with self._lock:
            return self._tiers.get(tier, 0)

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy for metrics."""
        with self._lock:
            return {
                "budget_bytes": self.budget_bytes, "device": dict(self._device), "device_used_bytes": self.device_used,
                "device_peak_bytes": self._peak, "tiers": dict(self._tiers),
            }
