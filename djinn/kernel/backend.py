"""What the kernel needs of the engine: the few operations that place a session's KV.

The kernel decides where KV lives and accounts for every byte; the engine (``djinn.engine``) owns the
tensors. The kernel holds each session's KV as an opaque handle made by ``new_kv`` and moves it only
through these methods, so it imports no torch and no model code. Methods that touch the KV pool are
coroutines: the engine runs them where the pool may be touched (the model thread on CPU, where the
pool grows) and copies on a stream of its own (CUDA).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any


class KVBackend(ABC):
    """The engine side of the kernel's residency state machine."""

    #: host tiers allocate page-locked memory when this is True (the engine copies with CUDA)
    pinned_host: bool = False

    @abstractmethod
    def new_kv(self) -> Any:
        """An empty KV handle for a new session (no device memory yet)."""

    @abstractmethod
    def kv_bytes(self, tokens: int) -> int:
        """Device bytes of a KV holding ``tokens`` tokens (whole blocks)."""

    @abstractmethod
    def held_bytes(self, kv: Any) -> int:
        """Device bytes ``kv`` holds now (its capacity, not its length)."""

    @abstractmethod
    async def grow(self, kv: Any, tokens: int) -> None:
        """Give ``kv`` room for ``tokens`` tokens; the kernel reserved the bytes first."""

    @abstractmethod
    async def release(self, kv: Any, *, keep_capacity: bool) -> None:
        """Free ``kv``'s device blocks. ``keep_capacity``: it is evicted and will come back at its
        size; otherwise its tokens are gone (closed, or dropped for a recompute)."""

    @abstractmethod
    async def copy_out(self, kv: Any, host: Any) -> None:
        """Copy ``kv``'s device blocks into ``host`` (a tier's uint8 view of ``held_bytes``),
        after the compute already queued; return when the bytes are there."""

    @abstractmethod
    async def copy_in(self, kv: Any, host: Any) -> None:
        """Allocate ``kv``'s blocks again and copy ``host`` into them, without waiting behind
        other sessions' compute; return when the KV may be used."""

    @abstractmethod
    async def recompute(self, kv: Any, tokens: Sequence[int]) -> None:
        """Refill a dropped ``kv`` by prefilling ``tokens`` again (its capacity is already there)."""

    @abstractmethod
    async def cancel(self, kv: Any) -> None:
        """Stop any engine work on ``kv`` and return once the engine no longer touches it."""

    def stats(self) -> dict[str, Any]:
        """The engine's figures for ``/metrics/vmu`` (under ``engine``)."""
        return {}

    def stop(self) -> None:
        """Release threads and device memory. Once, when the kernel stops."""
