"""Moving one session between two servers: its KV bytes and the token state that goes with them.

A session on a server is its KV (blocks in the engine's pool, or a copy in a tier) and the
tokens whose KV it holds (``Session.history``), plus at most one *pending* token: the last one
a generate picked, which is fed at the front of the session's next request (``ModelService.context``
shows it). ``export_session`` reads all of that without changing the session; ``import_session``
fills an empty session of another server with it. The bytes travel as the tier format, a flat
uint8 buffer of ``[L, 2, capacity, H_kv, D]`` (what ``KVBackend.copy_out`` writes and
``copy_in`` reads), so the two servers must share the model and the KV layout
(``kv_layout`` says which; the import refuses a mismatch).

The pending token is not written into the new server: the caller (the router) sends it at the
front of the session's next request, which is what the old server would have done, so the next
prefill computes exactly the same rows and the session continues token-exact.

Everything here runs on the server's event-loop thread and uses the kernel's and the engine's
public API only: the session's lock and busy mark keep requests and evictions away while its KV
is read, exactly as ``Kernel.serving`` keeps them away while a request runs.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from typing import Any

import attrs
import torch

from djinn.kernel.errors import SessionError
from djinn.kernel.kernel import Kernel, Session
from djinn.kernel.strategies import Phase, Residency


@attrs.frozen
class SessionState:
    """A session's token state and the shape of its KV bytes, as one server hands it to another."""

    #: the tokens whose KV the bytes hold, in order
    history: tuple[int, ...]
    #: the picked-but-not-fed token (0 or 1 of them): the next request feeds it first
    pending: tuple[int, ...]
    #: tokens of KV capacity the bytes hold (whole blocks), and their size
    capacity: int
    nbytes: int
    #: what the bytes mean: the model and the KV pool's layout (``kv_layout``)
    layout: dict[str, Any]
    #: False once a breakpoint pass ran: its KV may come from edited activations and must never be recomputed
    recomputable: bool
    #: the session's phase, and the seconds left of its client's expected IO_WAIT
    phase: str
    expected_s: float | None
    #: True when there are no bytes: the session's KV was dropped and is prefilled again from ``history``
    recompute: bool = False


def kv_layout(kernel: Kernel, model: Any) -> dict[str, Any]:
    """What a session's KV bytes mean on this server: model, dtype, seed and the pool's shape."""
    pool = model.runner.pool
    config = kernel.config
    return {
        "model": config.model.name, "dtype": config.model.dtype, "seed": config.model.seed,
        "layers": pool.num_layers, "kv_heads": pool.kv_heads, "head_dim": pool.head_dim,
        "block_tokens": pool.block_tokens, "bytes_per_token": pool.bytes_per_token,
    }


async def _moves_settled(session: Session) -> None:
    """Return once no move of the session's KV is in flight (a move is waited for, never cancelled)."""
    while session.moving is not None and not session.moving.done():
        await asyncio.wait({session.moving})


async def export_session(kernel: Kernel, model: Any, session_id: int) -> tuple[SessionState, torch.Tensor | None]:
    """The session's state and a host copy of its KV (``[nbytes]`` uint8; None when it was dropped).

    The session is left as it was: a request arriving meanwhile waits on its lock, and no
    eviction or write-back starts while it is marked busy. An evicted session's bytes are read
    from its tier; a move that starts while they are read (a prefetch, a demotion) is detected
    afterwards and the read is done again from where the KV is then.
    """
    session = kernel.get(session_id)
    async with session.lock:
        if session.closed:
            raise SessionError(f"session {session_id} is closed")
        session.update(busy=True)
        try:
            host = await _read_kv(kernel, model, session)
        finally:
            session.update(busy=False)
        info = session.info
        now = time.monotonic()
        expected = None if info.expected_resume_at is None else max(0.0, info.expected_resume_at - now)
        context = model.context(session)
        history = tuple(session.history)
        capacity = len(history) if host is None else session.kv.capacity
        state = SessionState(
            history=history, pending=tuple(context[len(history):]), capacity=capacity,
            nbytes=0 if host is None else host.numel(), layout=kv_layout(kernel, model),
            recomputable=session.recomputable, phase=info.phase.value, expected_s=expected,
            recompute=host is None,
        )
    return state, host


async def _read_kv(kernel: Kernel, model: Any, session: Session) -> torch.Tensor | None:
    while True:
        await _moves_settled(session)
        info = session.info
        if session.dropped:
            return None
        if info.residency is Residency.RESIDENT and not info.backed:
            nbytes = model.held_bytes(session.kv)
            host = torch.empty(nbytes, dtype=torch.uint8)
            if nbytes:
                await model.copy_out(session.kv, host)
            return host
        if session.block is None:  # RESTORING or EVICTING without a move: cannot last, look again
            await asyncio.sleep(0)
            continue
        # a tier copy: EVICTED, or RESIDENT with a clean copy (a write-back). While the session is
        # busy a backed copy cannot go (a reclaim needs an idle session), but an evicted one can
        # be restored or demoted by the scheduler meanwhile, so the read is checked afterwards
        tier, block, moving = session.tier, session.block, session.moving
        source = kernel.tiers[tier].view(block)
        host = await asyncio.to_thread(source.clone)  # off the loop: a GiB copy takes a while
        if session.tier == tier and session.block is block and session.moving is moving:
            return host


async def import_session(kernel: Kernel, model: Any, session_id: int, state: SessionState,
                         host: torch.Tensor | None) -> float:
    """Fill the empty open session ``session_id`` with ``state`` and the KV bytes ``host``.

    The KV's room is reserved and allocated as a request's would be (``Kernel.serving``: it may
    evict other sessions or wait for memory, or fail with ``AdmissionError``). A session that was
    in IO_WAIT is signalled IO_WAIT again here, with what was left of its expected wait, so the
    scheduler treats it as the idle session it is. Returns the seconds the copy in took.
    """
    layout = kv_layout(kernel, model)
    if state.layout != layout:
        different = sorted(k for k in layout if state.layout.get(k) != layout[k])
        raise SessionError(
            f"the session's KV was made by another model or layout ({', '.join(different)} differ: "
            f"{ {k: state.layout.get(k) for k in different} } here { {k: layout[k] for k in different} })"
        )
    if state.recompute != (host is None):
        raise SessionError("a session's KV bytes are missing" if host is None else "a dropped session came with bytes")
    if host is not None and (host.dtype != torch.uint8 or host.dim() != 1 or host.numel() != state.nbytes):
        raise SessionError(f"the session's KV bytes must be {state.nbytes} uint8 values, not {tuple(host.shape)} {host.dtype}")
    session = kernel.get(session_id)
    if model.context(session) or model.held_bytes(session.kv):
        raise SessionError(f"session {session_id} is not empty: only a new session takes an imported one")
    started = time.perf_counter()
    async with kernel.serving(session, state.capacity):
        kv = session.kv
        if host is not None and state.nbytes:
            if kv.nbytes != state.nbytes:
                raise SessionError(f"{state.capacity} tokens of KV are {kv.nbytes} bytes here, not {state.nbytes}")
            # through the backend's own restore path (a copy stream on CUDA, not behind other
            # sessions' compute): give back the blocks just grown, then copy in at the same size
            await model.release(kv, keep_capacity=True)
            try:
                await model.copy_in(kv, host)
            except BaseException:
                if not kv.resident:  # the kernel counts these bytes as held: hold them again
                    await model.grow(kv, state.capacity)
                raise
            kv.length = len(state.history)
        elif state.history:
            await model.recompute(kv, list(state.history))
        session.history[:] = state.history
        session.recomputable = state.recomputable
    seconds = time.perf_counter() - started
    if state.phase == Phase.IO_WAIT.value:
        await kernel.signal_phase(session, Phase.IO_WAIT, state.expected_s)
    return seconds


def host_bytes(array: Any) -> torch.Tensor:
    """A received KV buffer (a numpy array, read-only when it is a view of Ray's object store) as
    the uint8 tensor ``import_session`` takes, without a copy: the import only reads it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(array).view(torch.uint8).reshape(-1)
