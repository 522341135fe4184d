"""The hooks the server calls: breakpoint resumes (the engine calls ``djinn_breakpoint_hit``,
``djinn.engine.hookspecs``), connections, failed requests and metrics.

Declared with the kernel's markers (``djinn.kernel.hookspecs``) and loaded by every plugin manager
through the entry-point group ``djinn.hookspecs``, before any plugin registers: a plugin implements
them with ``djinn.kernel.hookspecs.hookimpl`` like any other hook. Unless a hook says otherwise, it
is called on the server's event-loop thread and its result is ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from djinn.kernel.hookspecs import hookspec

if TYPE_CHECKING:
    from djinn.kernel.kernel import Kernel
    from djinn.kernel.strategies import SessionInfo


# =========================================================================== breakpoints
@hookspec
def djinn_breakpoint_resumed(session: SessionInfo, layer: int, edited: bool, waited_s: float) -> None:
    """A paused forward pass resumed, with or without an edit of the activation."""


# =========================================================================== transports
@hookspec
def djinn_connection_opened(peer: str, transport: str) -> None:
    """A client connected (after authentication). Once per connection."""


@hookspec
def djinn_connection_closed(peer: str, transport: str, reason: str) -> None:
    """A connection ended; its sessions have been freed. Once per connection."""


@hookspec
def djinn_request_failed(op: str, session_id: int | None, error: BaseException) -> None:
    """A request ended with an error reply. Once per failed request."""


# =========================================================================== metrics
@hookspec
def djinn_metrics(kernel: Kernel) -> dict[str, Any] | None:
    """Contribute figures to ``/metrics/vmu`` when it is read: a dict, conventionally ``{plugin_name:
    {...}}``, merged with the other plugins' into its ``plugins`` table. For Prometheus series, register
    ``prometheus_client`` collectors on ``kernel.metrics_registry`` (``/metrics``) in ``djinn_startup``."""
