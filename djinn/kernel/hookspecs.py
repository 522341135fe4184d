"""The hooks the kernel calls, grouped by family, and the markers every hook is declared and
implemented with.

The engine's and the server's hooks are declared next to their callers (``djinn.engine.hookspecs``,
``djinn.server.hookspecs``); every plugin manager loads those modules through the entry-point group
``djinn.hookspecs`` before any plugin registers, so a plugin implements any hook with ``hookimpl``
from here, whichever layer declares it.

Hooks are for registration and events: called per start-up, request, phase change or step, never
per chunk or per layer per token (a pluggy call costs microseconds). Hot-path work goes through the
strategy objects that plugins register here, called directly; ``strategies.py`` names their contracts.

pluggy calls implementations last-registered-first; the kernel registers plugins in the order of
their entry points' names, so no plugin may depend on another's implementation running first. Unless
a hook says otherwise, it is called on the server's event-loop thread and its result is ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from djinn.kernel.config import KernelConfig
    from djinn.kernel.kernel import Kernel
    from djinn.kernel.plugins import StrategyRegistry
    from djinn.kernel.strategies import Phase, SessionInfo

PROJECT = "djinn"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# =========================================================================== registration
@hookspec
def djinn_register_strategies(registry: StrategyRegistry) -> None:
    """Register the strategies this plugin offers: ``registry.add(slot, name, factory, settings=...)``.

    Called once per plugin manager, at discovery, for every installed plugin (selected or not), so
    ``djinn plugins`` can list slots. ``factory(settings)`` (``factory()`` without settings) builds
    the strategy later, only if selected; ``settings`` is an attrs class whose fields are the plugin's
    keys in ``plugins.toml`` (``[settings.NAME]``). A plugin that registers nothing is an extension."""


# =========================================================================== lifecycle
@hookspec
def djinn_configure(config: KernelConfig) -> None:
    """The configuration is validated and the selection final (a server passes the whole
    ``djinn.config.DjinnConfig``). Once, before start-up, for selected plugins only. Raise
    ``ConfigError`` to refuse it."""


@hookspec
def djinn_startup(kernel: Kernel) -> None:
    """The kernel has built its strategies, allocated its tiers and loaded its models. Called once,
    after ``djinn_configure``, on the thread that starts the kernel."""


@hookspec
def djinn_shutdown(kernel: Kernel) -> None:
    """The kernel is stopping; release what ``djinn_startup`` took. Once, after the server has closed
    its clients' sessions (each with ``djinn_session_closed``), before the kernel frees any left and
    releases its tiers; like every hook, last-registered plugin first."""


# =========================================================================== sessions and phases
@hookspec
def djinn_session_created(session: SessionInfo) -> None:
    """A client opened a session. Once per session."""


@hookspec
def djinn_session_closed(session: SessionInfo, reason: str) -> None:
    """A session ended (``reason``: "closed", "disconnected"; an HTTP API session: "expired",
    "shutdown"); its memory is freed."""


@hookspec
def djinn_phase_changed(session: SessionInfo, old: Phase, new: Phase) -> None:
    """A client signalled a phase (``IO_WAIT``, ``COMPUTE``); ``session.expected_resume_at`` holds
    its hint. Called once per signal, after the scheduler has decided what to do with it."""


# =========================================================================== eviction / prefetch
@hookspec
def djinn_session_evicted(session: SessionInfo, tier: str, nbytes: int, seconds: float) -> None:
    """A session's KV has left the GPU for ``tier``; ``seconds`` is the copy's duration. Once per
    eviction, when the copy has completed. ``tier`` is ``"dropped"`` when a ``drops_kv`` scheduler
    freed the KV without a copy; a reclaim of a written-back session (its copy already in ``tier``)
    reports ``seconds`` 0."""


@hookspec
def djinn_session_written_back(session: SessionInfo, tier: str, nbytes: int, seconds: float) -> None:
    """A resident session's KV was copied to ``tier`` and stays on the GPU too (a write-back);
    ``seconds`` is the copy's duration. Once per write-back, when the copy has completed."""


@hookspec
def djinn_session_restored(session: SessionInfo, tier: str, nbytes: int, seconds: float, on_critical_path: bool) -> None:
    """A session's KV is back on the GPU. ``on_critical_path`` is True when a request had to
    wait for this restore (a prefetch that finished in time is not on the critical path).
    ``tier`` is ``"dropped"`` when the KV was recomputed by prefilling the session's tokens again."""


@hookspec
def djinn_admission_blocked(need_bytes: int, free_bytes: int, queued: int) -> None:
    """A request did not fit and no eviction could make room; it waits in the admission queue
    (``queued`` requests now) or, when the queue is full, fails with ``AdmissionError``."""
