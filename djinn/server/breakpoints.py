"""Breakpoint pauses: a forward pass stopped at an armed layer, served to its client.

The pass waits on the model service's side (``ModelService.generate`` awaits ``pause``) while
the model thread serves everyone else; the client's INSPECT, EDIT and RESUME frames reach the
pause through ``handle``. Edits run on the model thread, in inference mode.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from djinn.kernel.errors import BreakpointError
from djinn.kernel.kernel import Session
from djinn.kernel.plugins import DjinnPlugins
from djinn.server.validate import number
from djinn.server.wire import Frame, Op


@attrs.define(eq=False)
class Pause:
    """A forward pass paused at a breakpoint, waiting for its client."""

    session: Session
    cursor: Any
    layer: int
    step: int
    phase: str
    resumed: asyncio.Future
    edited: bool = False
    since: float = attrs.Factory(time.perf_counter)


class Breakpoints:
    """Every client's pauses: the BREAK frame out, the client's inspections and edits in.

    ``client.pauses`` (a dict by session id) holds the client's pauses; ``send(client, frame)``
    sends a frame to it; ``run_model`` runs work on the model thread.
    """

    def __init__(
        self, send: Callable[[Any, Frame], Awaitable[None]], run_model: Callable[..., Awaitable[Any]],
        plugins: DjinnPlugins, timeout_s: float,
    ) -> None:
        self.send, self.run_model, self.plugins, self.timeout_s = send, run_model, plugins, timeout_s

    async def pause(
        self, client: Any, request_id: int, session: Session, cursor: Any, layer: int, step: int, phase: str
    ) -> None:
        """Tell ``client`` its pass stopped at ``layer`` and wait until it resumes (or times out)."""
        loop = asyncio.get_running_loop()
        pause = Pause(session, cursor, layer, step, phase, loop.create_future())
        client.pauses[session.info.id] = pause
        hidden = cursor.hidden
        try:
            await self.send(client, Frame(
                Op.BREAK, request_id=request_id, session_id=session.info.id,
                meta={"layer": layer, "step": step, "phase": phase, "shape": list(hidden.shape),
                      "dtype": str(hidden.dtype).removeprefix("torch.")},
            ))
            timeout = self.timeout_s
            try:
                await asyncio.wait_for(asyncio.shield(pause.resumed), timeout)
            except TimeoutError:
                raise BreakpointError(f"breakpoint at layer {layer} abandoned for {timeout:.0f} s") from None
        finally:
            client.pauses.pop(session.info.id, None)
        self.plugins.notify(
            "djinn_breakpoint_resumed", session=session.info, layer=layer, edited=pause.edited,
            waited_s=time.perf_counter() - pause.since,
        )

    async def handle(self, client: Any, frame: Frame) -> Frame:
        """Serve an INSPECT, EDIT or RESUME frame of a client whose session is paused."""
        pause = client.pauses.get(frame.session_id)
        if pause is None:
            raise BreakpointError(f"session {frame.session_id} is not paused at a breakpoint")
        if frame.op is Op.RESUME:
            if not pause.resumed.done():
                pause.resumed.set_result(None)
            return Frame(Op.OK)
        run = self.run_model
        if frame.op is Op.INSPECT:
            what = frame.meta.get("what", "stats")
            if what == "stats":
                return Frame(Op.RESULT, meta=await run(_stats, pause.cursor.hidden))
            if what == "fetch":
                return Frame(Op.RESULT, tensors=(await run(_to_host, pause.cursor.hidden),))
            raise BreakpointError(f"inspect what={what!r}; one of: stats, fetch")
        edit = frame.meta.get("op")
        hidden = pause.cursor.hidden
        if edit == "scale":
            factor = number(frame.meta, "factor", None)
            await run(_edit_in_place, hidden.mul_, factor)
        elif edit in ("set", "add"):
            if len(frame.tensors) != 1:
                raise BreakpointError(f"{edit} needs one tensor")
            value = frame.tensors[0]
            want = tuple(hidden.shape) if edit == "set" else (hidden.shape[-1],)
            if tuple(value.shape) != want and not (edit == "add" and tuple(value.shape) == tuple(hidden.shape)):
                raise BreakpointError(f"{edit}: shape {tuple(value.shape)} does not match {want}")
            if not value.dtype.is_floating_point:
                raise BreakpointError(f"{edit}: dtype {value.dtype} is not a floating-point type")
            moved = value.to(device=hidden.device, dtype=hidden.dtype)
            await run(_edit_in_place, hidden.copy_ if edit == "set" else hidden.add_, moved)
        else:
            raise BreakpointError(f"edit op={edit!r}; one of: set, scale, add")
        pause.edited = True
        return Frame(Op.OK)


def _stats(hidden: Any) -> dict[str, Any]:
    h = hidden.float()
    return {
        "shape": list(hidden.shape), "dtype": str(hidden.dtype).removeprefix("torch."),
        "mean": h.mean().item(), "std": h.std().item() if h.numel() > 1 else 0.0,
        "min": h.min().item(), "max": h.max().item(), "norm": h.norm().item(),
    }


def _edit_in_place(method: Callable[[Any], Any], value: Any) -> None:
    import torch

    # the activation is an inference tensor: in-place writes are allowed only in inference mode
    with torch.inference_mode():
        method(value)


def _to_host(hidden: Any) -> Any:
    return hidden.detach().to("cpu", copy=True)


