"""Shared victim picking for schedulers: take sessions in a given order until enough bytes are freed."""

from __future__ import annotations

from collections.abc import Iterable

from djinn.kernel.strategies import SessionInfo


def take_until(ordered: Iterable[SessionInfo], need_bytes: int) -> list[SessionInfo]:
    """Sessions from ``ordered`` until their KV adds up to ``need_bytes``; [] if it never does."""
    chosen: list[SessionInfo] = []
    freed = 0
    for session in ordered:
        if freed >= need_bytes:
            break
        chosen.append(session)
        freed += session.kv_bytes
    return chosen if freed >= need_bytes else []
