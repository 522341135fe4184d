"""The asyncio client: one connection, many in-flight requests matched by request id."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
import torch

from djinn.kernel.config import DjinnConfig, PluginSelection
from djinn.kernel.errors import BreakpointError, ConnectionClosed, DjinnError, PluginError
from djinn.kernel.plugins import DjinnPlugins
from djinn.server.wire import Frame, Op, WireLimits, decode_frame, encode_frame, raise_for_error

Inputs = str | Sequence[int] | torch.Tensor


@attrs.frozen
class Generation:
    """A finished generate request: the new tokens, their text when the model has a tokenizer,
    and the server's timings (queue, restore, prefill, decode, first token)."""

    tokens: list[int]
    text: str | None
    timings: dict[str, float]


def _plugins_for_client(serializer: str) -> DjinnPlugins:
    plugins = DjinnPlugins(DjinnConfig(plugins=PluginSelection(serializer=serializer)))
    plugins.discover()
    return plugins


def _transport_for(plugins: DjinnPlugins, scheme: str) -> Any:
    spec = plugins.strategies.get(scheme)
    if spec is None or spec.slot != "transport":
        known = sorted(n for n, s in plugins.strategies.items() if s.slot == "transport")
        raise PluginError(f"no transport plugin for {scheme}://; installed: {', '.join(known)}")
    return plugins.build(scheme)


class AsyncClient:
    """A connection to a Djinn server. Use ``await AsyncClient.connect(url)`` or ``connect_async``."""

    def __init__(self, conn: Any, serializer: Any, limits: WireLimits) -> None:
        self._conn = conn
        self._serializer = serializer
        self._limits = limits
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._breaks: dict[int, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None
        self._closed_error: BaseException | None = None
        self.info: dict[str, Any] = {}

    @classmethod
    async def connect(
        cls, url: str, token: str | None = None, *, serializer: str = "arrow", max_frame_mb: int = 1024
    ) -> AsyncClient:
        """Open a connection and authenticate; ``info`` then describes the served model."""
        plugins = _plugins_for_client(serializer)
        transport = _transport_for(plugins, urlsplit(url).scheme)
        limits = WireLimits(max_payload_bytes=max_frame_mb << 20)
        conn = await transport.connect(url, max_frame_bytes=limits.max_payload_bytes + limits.max_meta_bytes + 4096)
        client = cls(conn, plugins.build(serializer), limits)
        client._reader = asyncio.create_task(client._read_loop())
        welcome = await client.request(Op.HELLO, meta={"token": token or ""})
        client.info = dict(welcome.meta)
        return client

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = decode_frame(await self._conn.recv(), self._serializer, self._limits)
                if frame.op is Op.BREAK and frame.request_id in self._breaks:
                    self._breaks[frame.request_id].put_nowait(frame)
                    continue
                future = self._pending.pop(frame.request_id, None)
                if future is not None and not future.done():
                    future.set_result(frame)
        except (ConnectionClosed, DjinnError, OSError) as exc:
            self._closed_error = exc if isinstance(exc, ConnectionClosed) else ConnectionClosed(str(exc))
        finally:
            error = self._closed_error or ConnectionClosed("connection closed")
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            for queue in self._breaks.values():
                queue.put_nowait(error)

    def _new_request(self) -> tuple[int, asyncio.Future]:
        if self._reader is not None and self._reader.done():
            raise self._closed_error or ConnectionClosed("connection closed")
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        return request_id, future

    async def send(self, op: Op, *, session_id: int = 0, meta: dict | None = None,
                   tensors: Sequence[torch.Tensor] = (), request_id: int = 0) -> None:
        """Send one frame without waiting for a reply."""
        frame = Frame(op, session_id=session_id, request_id=request_id, meta=meta or {}, tensors=tuple(tensors))
        await self._conn.send(encode_frame(frame, self._serializer))

    async def request(self, op: Op, *, session_id: int = 0, meta: dict | None = None,
                      tensors: Sequence[torch.Tensor] = ()) -> Frame:
        """Send a request and wait for its reply; an ERROR reply raises the matching DjinnError."""
        request_id, future = self._new_request()
        try:
            await self.send(op, session_id=session_id, meta=meta, tensors=tensors, request_id=request_id)
            reply = await future
        finally:
            self._pending.pop(request_id, None)
        raise_for_error(reply)
        return reply

    async def model(self, name: str | None = None) -> AsyncRemoteModel:
        """The served model (a server serves one; ``name`` is checked against it when given)."""
        if name is not None and name != self.info.get("model"):
            raise DjinnError(f"this server serves {self.info.get('model')!r}, not {name!r}")
        return AsyncRemoteModel(self)

    async def status(self) -> dict[str, Any]:
        """The server's memory and session view (what ``/metrics/vmu`` shows)."""
        return dict((await self.request(Op.STATUS)).meta)

    async def close(self) -> None:
        """Close the connection; the server frees this connection's sessions."""
        await self._conn.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class AsyncRemoteModel:
    """A handle on the server's model; sessions hold their KV on the server."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.info = client.info

    @property
    def num_layers(self) -> int:
        """Decoder layers (valid breakpoint layers are 0 .. num_layers - 1)."""
        return int(self.info["num_layers"])

    async def session(self) -> AsyncSession:
        """Open a session (its KV lives on the server until it is closed)."""
        reply = await self.client.request(Op.OPEN_SESSION)
        return AsyncSession(self.client, int(reply.meta["session_id"]))


def _input_frame(inputs: Inputs) -> tuple[dict[str, Any], tuple[torch.Tensor, ...]]:
    if isinstance(inputs, str):
        return {"text": inputs}, ()
    ids = inputs if isinstance(inputs, torch.Tensor) else torch.tensor(list(inputs), dtype=torch.int64)
    return {}, (ids.reshape(-1).to(torch.int64),)


class AsyncSession:
    """One conversation's server-resident state."""

    def __init__(self, client: AsyncClient, session_id: int) -> None:
        self.client = client
        self.id = session_id

    async def generate(
        self, inputs: Inputs, max_new_tokens: int = 16, *, temperature: float = 0.0, top_k: int = 0,
        seed: int | None = None, breakpoints: Sequence[int] = (),
        on_break: Callable[[AsyncBreakpoint], Awaitable[None]] | None = None,
    ) -> Generation:
        """Append ``inputs`` (text or token ids) and generate; greedy unless ``temperature`` > 0.

        With ``breakpoints``, ``on_break(hit)`` is awaited at every hit; the pass resumes when it
        returns (unmodified unless it edited the activation).
        """
        trace = self.trace(inputs, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                           breakpoints=breakpoints)
        async for hit in trace:
            if on_break is not None:
                await on_break(hit)
        return trace.result

    def trace(
        self, inputs: Inputs, max_new_tokens: int = 16, *, temperature: float = 0.0, top_k: int = 0,
        seed: int | None = None, breakpoints: Sequence[int] = (),
    ) -> AsyncTrace:
        """Generate with breakpoints as an async iterator of hits; ``.result`` once it ends."""
        meta, tensors = _input_frame(inputs)
        meta.update(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    breakpoints=sorted(set(breakpoints)))
        if seed is not None:
            meta["seed"] = seed
        return AsyncTrace(self, meta, tensors)

    async def signal_phase(self, phase: str, expected_s: float | None = None) -> None:
        """Tell the server what this agent does next (``IO_WAIT`` or ``COMPUTE``); returns at once."""
        meta: dict[str, Any] = {"phase": phase, "reply": False}
        if expected_s is not None:
            meta["expected_s"] = expected_s
        await self.client.send(Op.SIGNAL_PHASE, session_id=self.id, meta=meta)

    async def close(self) -> None:
        """Free the session's KV on the server."""
        await self.client.request(Op.CLOSE_SESSION, session_id=self.id)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class AsyncTrace:
    """Async iterator over the breakpoint hits of one generate request."""

    def __init__(self, session: AsyncSession, meta: dict[str, Any], tensors: tuple[torch.Tensor, ...]) -> None:
        self.session = session
        self._meta, self._tensors = meta, tensors
        self._queue: asyncio.Queue | None = None
        self._reply: asyncio.Task | None = None
        self._last: AsyncBreakpoint | None = None
        self._result: Generation | None = None

    @property
    def result(self) -> Generation:
        """The generation, once iteration has ended."""
        if self._result is None:
            raise BreakpointError("the trace has not finished")
        return self._result

    def __aiter__(self) -> AsyncTrace:
        return self

    async def _start(self) -> None:
        client = self.session.client
        request_id, future = client._new_request()
        self._queue = asyncio.Queue()
        client._breaks[request_id] = self._queue

        async def finish() -> Frame:
            try:
                await client.send(Op.GENERATE, session_id=self.session.id, meta=self._meta,
                                  tensors=self._tensors, request_id=request_id)
                return await future
            finally:
                client._pending.pop(request_id, None)

        self._reply = asyncio.create_task(finish())
        self._reply.add_done_callback(lambda _t: self._queue.put_nowait(None))
        self._request_id = request_id

    async def __anext__(self) -> AsyncBreakpoint:
        if self._queue is None:
            await self._start()
        if self._last is not None and not self._last.resumed:
            try:
                await self._last.resume()
            except BreakpointError:
                # the pause already ended on the server (abandoned); the request's own error follows
                self._last.resumed = True
        item = await self._queue.get()
        if isinstance(item, Frame):
            self._last = AsyncBreakpoint(self.session, item.meta)
            return self._last
        self.session.client._breaks.pop(self._request_id, None)
        if isinstance(item, BaseException):
            raise item
        reply = await self._reply  # raises the request's error, if any
        raise_for_error(reply)
        tokens = reply.tensors[0].tolist() if reply.tensors else []
        timings = {k: v for k, v in reply.meta.items() if k.endswith("_s")}
        self._result = Generation(tokens=tokens, text=reply.meta.get("text"), timings=timings)
        raise StopAsyncIteration


class AsyncBreakpoint:
    """A forward pass paused after a layer. The activation stays on the server until fetched."""

    def __init__(self, session: AsyncSession, meta: dict[str, Any]) -> None:
        self.session = session
        self.layer: int = meta["layer"]
        self.step: int = meta["step"]
        self.phase: str = meta["phase"]
        self.shape: tuple[int, ...] = tuple(meta["shape"])
        self.dtype: str = meta["dtype"]
        self.resumed = False

    async def _call(self, op: Op, meta: dict[str, Any] | None = None, tensors: Sequence[torch.Tensor] = ()) -> Frame:
        if self.resumed:
            raise BreakpointError("this breakpoint has been resumed")
        return await self.session.client.request(op, session_id=self.session.id, meta=meta, tensors=tensors)

    async def stats(self) -> dict[str, Any]:
        """mean, std, min, max and norm of the activation, computed on the server."""
        return dict((await self._call(Op.INSPECT, {"what": "stats"})).meta)

    async def fetch(self) -> torch.Tensor:
        """The activation [1, T, hidden] as a CPU tensor (a copy you may modify)."""
        return (await self._call(Op.INSPECT, {"what": "fetch"})).tensors[0].clone()

    async def set(self, value: torch.Tensor) -> None:
        """Replace the activation (same shape)."""
        await self._call(Op.EDIT, {"op": "set"}, (value.detach().cpu(),))

    async def scale(self, factor: float) -> None:
        """Multiply the activation by ``factor`` on the server."""
        await self._call(Op.EDIT, {"op": "scale", "factor": float(factor)})

    async def add(self, vector: torch.Tensor) -> None:
        """Add a steering vector [hidden] (or a full [1, T, hidden] tensor) on the server."""
        await self._call(Op.EDIT, {"op": "add"}, (vector.detach().cpu(),))

    async def resume(self) -> None:
        """Let the forward pass continue."""
        await self._call(Op.RESUME)
        self.resumed = True


async def connect_async(url: str, token: str | None = None, **kwargs: Any) -> AsyncClient:
    """Connect to a Djinn server at ``url`` (``tcp://host:port``, ``inproc://name``, ``ucx://...``)."""
    return await AsyncClient.connect(url, token, **kwargs)
