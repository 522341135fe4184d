"""The hooks the server calls: breakpoint resumes (the engine calls ``djinn_breakpoint_hit``),
connections, failed requests and metrics. A plugin implements them with the kernel's ``hookimpl``;
``djinn.kernel.hookspecs`` says how every plugin manager learns them and where hooks are called.
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
