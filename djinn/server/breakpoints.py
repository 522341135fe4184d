"""Breakpoint pauses: a forward pass stopped at an armed layer, served to its client.

The pass waits on the model service's side (``ModelService.generate`` awaits ``pause``) while
the model thread serves everyone else; the client's INSPECT, EDIT and RESUME frames reach the
pause through ``handle``. Edits are applied on the model thread, in inference mode.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs

from djinn.kernel.errors import BreakpointError
from djinn.kernel.kernel import Session
from djinn.kernel.plugins import DjinnPlugins
from djinn.server.validate import number
from djinn.wire.frames import Frame, Op, check_edit_tensor


@attrs.frozen
class Edit:
    """One checked edit of a paused activation: ``scale`` by ``value`` (a float), ``set`` it to or
    ``add`` ``value`` (a host tensor)."""

    kind: str
    value: Any


@attrs.define(eq=False)
class Pause:
    """A forward pass paused at a breakpoint, waiting for its client. ``pending``: edits received
    and checked, applied on the model thread before the activation is inspected or the pass goes on."""

    session: Session
    cursor: Any
    layer: int
    step: int
    phase: str
    resumed: asyncio.Future
    edited: bool = False
    since: float = attrs.Factory(time.perf_counter)
    pending: list[Edit] = attrs.Factory(list)


class Breakpoints:
    """Every client's pauses: the BREAK frame out, the client's inspections and edits in.

    ``client.pauses`` (a dict by session id) holds the client's pauses; ``send(client, frame)``
    sends a frame to it; ``run_model`` runs work on the model thread.

    Edits arrive in an EDIT frame (one: ``op``, ``factor``, the tensor) or inside an INSPECT or
    RESUME frame (``edits``: a list of ``{"op", "factor" | "tensor": index into the frame's
    tensors}``), so a client can send its edits and the resume in one round trip. They are checked
    when they arrive (a refused frame changes nothing) and applied, in order, on the model thread
    just before the activation is next read: by an INSPECT, or by the pass when it resumes.
    """

    def __init__(
        self, send: Callable[[Any, Frame], Awaitable[None]], run_model: Callable[..., Awaitable[Any]],
        plugins: DjinnPlugins, timeout_s: float,
    ) -> None:
        self.send, self.run_model, self.plugins, self.timeout_s = send, run_model, plugins, timeout_s

    async def pause(
        self, client: Any, request_id: int, session: Session, cursor: Any, layer: int, step: int, phase: str,
        at: str = "output",
    ) -> None:
        """Tell ``client`` its pass stopped at ``layer`` (``at``: after it, or where inside it) and
        wait until it resumes (or times out)."""
        loop = asyncio.get_running_loop()
        pause = Pause(session, cursor, layer, step, phase, loop.create_future())
        client.pauses[session.info.id] = pause
        hidden = cursor.hidden
        try:
            await self.send(client, Frame(
                Op.BREAK, request_id=request_id, session_id=session.info.id,
                meta={"layer": layer, "at": at, "step": step, "phase": phase, "shape": list(hidden.shape),
                      "dtype": str(hidden.dtype).removeprefix("torch.")},
            ))
            timeout = self.timeout_s
            try:
                await asyncio.wait_for(asyncio.shield(pause.resumed), timeout)
            except TimeoutError:
                raise BreakpointError(f"breakpoint at layer {layer} abandoned for {timeout:.0f} s") from None
        finally:
            client.pauses.pop(session.info.id, None)
        if pause.pending:  # the RESUME's reply has gone out: these are off the client's round trip
            await self.run_model(_apply_edits, cursor.hidden, _take(pause))
        self.plugins.notify(
            "djinn_breakpoint_resumed", session=session.info, layer=layer, edited=pause.edited,
            waited_s=time.perf_counter() - pause.since,
        )

    async def handle(self, client: Any, frame: Frame) -> Frame:
        """Serve an INSPECT, EDIT or RESUME frame of a client whose session is paused."""
        pause = client.pauses.get(frame.session_id)
        if pause is None:
            raise BreakpointError(f"session {frame.session_id} is not paused at a breakpoint")
        hidden = pause.cursor.hidden
        if frame.op is Op.EDIT:
            specs = [{**frame.meta, "tensor": 0} if frame.tensors else dict(frame.meta)]
        else:
            specs = frame.meta.get("edits", [])
        what = frame.meta.get("what", "stats") if frame.op is Op.INSPECT else None
        if what not in (None, "stats", "fetch"):
            raise BreakpointError(f"inspect what={what!r}; one of: stats, fetch")
        edits = _checked_edits(specs, frame.tensors, tuple(hidden.shape))
        pause.pending.extend(edits)
        pause.edited |= bool(edits)
        if frame.op is Op.RESUME:
            if not pause.resumed.done():
                pause.resumed.set_result(None)
            return Frame(Op.OK)
        if frame.op is Op.EDIT:
            return Frame(Op.OK)
        if what == "stats":
            return Frame(Op.RESULT, meta=await self.run_model(_inspect, _stats, hidden, _take(pause)))
        return Frame(Op.RESULT, tensors=(await self.run_model(_inspect, _to_host, hidden, _take(pause)),))


def _take(pause: Pause) -> list[Edit]:
    edits, pause.pending = pause.pending, []
    return edits


def _checked_edits(specs: Any, tensors: Sequence[Any], shape: tuple[int, ...]) -> list[Edit]:
    """The edits ``specs`` asks for, each checked against the activation's ``shape``."""
    if not isinstance(specs, list) or not all(isinstance(spec, dict) for spec in specs):
        raise BreakpointError("edits must be a list of objects")
    edits = []
    for spec in specs:
        kind = spec.get("op")
        if kind == "scale":
            edits.append(Edit(kind, number(spec, "factor", None)))
            continue
        if kind not in ("set", "add"):
            raise BreakpointError(f"edit op={kind!r}; one of: set, scale, add")
        index = spec.get("tensor")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(tensors):
            raise BreakpointError(f"{kind} needs one tensor")
        value = tensors[index]
        check_edit_tensor(kind, tuple(value.shape), value.dtype, shape)
        edits.append(Edit(kind, value))
    return edits


def _apply_edits(hidden: Any, edits: Sequence[Edit]) -> None:
    import torch

    # the activation is an inference tensor: in-place writes are allowed only in inference mode
    with torch.inference_mode():
        for edit in edits:
            if edit.kind == "scale":
                hidden.mul_(edit.value)
            else:
                value = edit.value.to(device=hidden.device, dtype=hidden.dtype)
                (hidden.copy_ if edit.kind == "set" else hidden.add_)(value)


def _inspect(read: Callable[[Any], Any], hidden: Any, edits: Sequence[Edit]) -> Any:
    """``read(hidden)`` after the pending ``edits``, in one visit to the model thread."""
    _apply_edits(hidden, edits)
    return read(hidden)


def _stats(hidden: Any) -> dict[str, Any]:
    h = hidden.float()
    return {
        "shape": list(hidden.shape), "dtype": str(hidden.dtype).removeprefix("torch."),
        "mean": h.mean().item(), "std": h.std().item() if h.numel() > 1 else 0.0,
        "min": h.min().item(), "max": h.max().item(), "norm": h.norm().item(),
    }


def _to_host(hidden: Any) -> Any:
    return hidden.detach().to("cpu", copy=True)


