"""Where a new session goes, which server is out of memory, and which idle session leaves it.

Pure functions over each server's ``ServerLoad`` (what ``DjinnNode.load`` reports): no I/O, so
the rules are tested on their own. Bytes are the unit everywhere:

- *device room*: free device bytes, plus the GPU bytes of idle sessions whose KV already has a
  clean copy in a tier (a write-back): the kernel frees those without a copy when it needs them.
- *room*: device room plus free tier bytes: what a server can still take before its requests
  have to wait for memory.
- *capacity*: the device budget less the weights, plus every tier's capacity.

A new session goes where admission is cheapest: no request waiting for memory first, then the
most device room (a request admitted there evicts nothing), then the most tier room (evicting
there has somewhere to go), then the fewest sessions. A server is under pressure when requests
wait for memory or its room falls below ``low_water`` of its capacity; an idle session then
moves to a server that keeps at least ``2 * low_water`` of its capacity after taking it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs


@attrs.frozen
class SessionLoad:
    """One session as its server reports it (``id`` is the server's own session id)."""

    id: int
    kv_bytes: int
    phase: str
    residency: str
    busy: bool
    backed: bool
    #: tokens of its context (those whose KV it holds, and a pending one)
    tokens: int = 0


@attrs.frozen
class ServerLoad:
    """A server's memory and queue at one moment."""

    name: str
    device_budget_bytes: int
    device_free_bytes: int
    reclaimable_bytes: int
    weights_bytes: int
    tier_capacity_bytes: int
    tier_free_bytes: int
    admission_queue: int
    sessions: tuple[SessionLoad, ...] = ()

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> ServerLoad:
        """Parse ``DjinnNode.load()``'s report (unknown keys are ignored)."""
        fields = {f.name for f in attrs.fields(cls)} - {"sessions"}
        sessions = tuple(SessionLoad(**{f.name: s[f.name] for f in attrs.fields(SessionLoad) if f.name in s})
                         for s in report.get("sessions", ()))
        return cls(**{k: report[k] for k in fields}, sessions=sessions)

    @property
    def device_room(self) -> int:
        """Bytes a request can take on the device without copying anything out."""
        return max(0, self.device_free_bytes) + self.reclaimable_bytes

    @property
    def room(self) -> int:
        """Device room plus free tier bytes."""
        return self.device_room + max(0, self.tier_free_bytes)

    @property
    def capacity(self) -> int:
        """KV bytes the server can hold at all: device budget less weights, plus the tiers."""
        return max(1, self.device_budget_bytes - self.weights_bytes + self.tier_capacity_bytes)

    def session(self, session_id: int) -> SessionLoad | None:
        """The session with the server's id ``session_id``, if it is open there."""
        return next((s for s in self.sessions if s.id == session_id), None)


def admission_key(load: ServerLoad, placed_since: int = 0) -> tuple[int, int, int, int]:
    """Sorts the cheapest server for a new session first. ``placed_since`` counts sessions
    placed there since ``load`` was read: each is charged the server's mean session size, so a
    burst of new sessions spreads instead of all taking the one server that looked emptiest."""
    sizes = [s.kv_bytes for s in load.sessions if s.kv_bytes]
    charge = placed_since * (sum(sizes) // len(sizes) if sizes else 0)
    return (load.admission_queue, -(load.device_room - charge), -load.tier_free_bytes,
            len(load.sessions) + placed_since)


def pick_server(loads: Mapping[str, ServerLoad], placed_since: Mapping[str, int] | None = None) -> str:
    """The name of the server where a new session is admitted most cheaply."""
    if not loads:
        raise ValueError("no server to place a session on")
    placed_since = placed_since or {}
    return min(loads, key=lambda name: (admission_key(loads[name], placed_since.get(name, 0)), name))


def under_pressure(load: ServerLoad, low_water: float) -> bool:
    """Requests wait for memory, or less than ``low_water`` of the server's capacity is free."""
    return load.admission_queue > 0 or load.room < low_water * load.capacity


def can_take(load: ServerLoad, nbytes: int, low_water: float) -> bool:
    """Whether the server may take ``nbytes`` more and keep ``2 * low_water`` of its capacity free."""
    return load.admission_queue == 0 and load.room - nbytes >= 2 * low_water * load.capacity


def pick_target(loads: Mapping[str, ServerLoad], source: str, nbytes: int, low_water: float) -> str | None:
    """The server other than ``source`` with the most room that can take ``nbytes``; None if none can."""
    fit = [name for name, load in loads.items() if name != source and can_take(load, nbytes, low_water)]
    return max(fit, key=lambda name: (loads[name].room, name), default=None)


def coldest_first(candidates: Iterable[tuple[Any, float | None, int]], now: float,
                  default_wait_s: float = 10.0) -> Sequence[Any]:
    """Idle sessions ordered for leaving a server: ``(session, expected_resume_at, kv_bytes)``,
    the one expected back latest first (no hint counts as ``default_wait_s`` from ``now``),
    then the largest, whose move frees the most."""
    ordered = sorted(candidates, key=lambda c: (-(c[1] if c[1] is not None else now + default_wait_s), -c[2]))
    return [c[0] for c in ordered]
