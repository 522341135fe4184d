"""The hooks the engine calls: weight streaming and breakpoint hits (the server calls
``djinn_breakpoint_resumed``). A plugin implements them with the kernel's ``hookimpl``;
``djinn.kernel.hookspecs`` says how every plugin manager learns them and where hooks are called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from djinn.kernel.hookspecs import hookspec

if TYPE_CHECKING:
    from djinn.kernel.strategies import SessionInfo


# =========================================================================== weight streaming
@hookspec
def djinn_stream_plan(model: str, layers: int, layer_bytes: list[int], ring_bytes: int) -> None:
    """A model's layers will be streamed through a ring of ``ring_bytes``. Once per model load."""


@hookspec
def djinn_stream_pass(model: str, bytes_streamed: int, seconds: float, stall_seconds: float) -> None:
    """A generate request on a streamed model finished: the weight bytes streamed for it, its model
    time and the time compute waited for copies. Once per request (never per chunk or layer)."""


# =========================================================================== breakpoints
@hookspec
def djinn_breakpoint_hit(session: SessionInfo, layer: int, step: int, phase: str, at: str) -> None:
    """A forward pass paused at an armed point (``phase``: "prefill" or "decode"; ``at``: "output"
    after the layer, "attention" or "mlp" inside it). Called only when a breakpoint is armed, once per hit."""
