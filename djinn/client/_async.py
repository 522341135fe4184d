"""The asyncio client: one connection, many in-flight requests matched by request id."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
import torch

from djinn.kernel.config import KernelConfig, PluginSelection
from djinn.kernel.errors import BreakpointError, DjinnError, PluginError, SessionError
from djinn.kernel.plugins import DjinnPlugins
from djinn.kernel.strategies import Phase
from djinn.wire.errors import ConnectionClosed
from djinn.wire.frames import Frame, Op, WireLimits, check_edit_tensor, decode_frame, encode_frame, raise_for_error

Inputs = str | Sequence[int] | torch.Tensor

#: seconds ``connect`` waits for the server to accept and answer the HELLO
CONNECT_TIMEOUT_S = 10.0


class RequestTimeout(DjinnError):
    """A request got no reply within its timeout (the connection stays usable)."""

    code = "timeout"


@attrs.frozen
class TokenLogprob:
    """A picked token's log-probability and, when asked for, the most likely tokens' ``(id, logprob)``."""

    logprob: float
    top: list[tuple[int, float]]


@attrs.frozen
class Generation:
    """A finished generate request: the new tokens, their text when the model has a tokenizer,
    the server's timings (queue, of it the admission wait for memory, restore, prefill, decode,
    first token), why it ended (``"length"`` or ``"stop"``), the context tokens whose KV was
    reused, and the tokens' log-probabilities when asked for."""

    tokens: list[int]
    text: str | None
    timings: dict[str, float]
    finish_reason: str = "length"
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None


def _logprobs(entries: Any) -> list[TokenLogprob] | None:
    if entries is None:
        return None
    return [TokenLogprob(float(e["logprob"]), [(int(t), float(v)) for t, v in e["top"]]) for e in entries]


def _plugins_for_client(serializer: str) -> DjinnPlugins:
    plugins = DjinnPlugins(KernelConfig(plugins=PluginSelection(serializer=serializer)))
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
        self._streams: dict[int, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None
        self._closed_error: BaseException | None = None
        self.info: dict[str, Any] = {}

    @classmethod
    async def connect(
        cls, url: str, token: str | None = None, *, serializer: str = "arrow", max_frame_mb: int = 1024,
        timeout: float | None = CONNECT_TIMEOUT_S,
    ) -> AsyncClient:
        """Open a connection and authenticate; ``info`` then describes the served model.

        Raises ``ConnectionClosed`` when the server does not accept and answer within
        ``timeout`` seconds (None waits for ever).
        """
        plugins = _plugins_for_client(serializer)
        transport = _transport_for(plugins, urlsplit(url).scheme)
        limits = WireLimits(max_payload_bytes=max_frame_mb << 20)
        client: AsyncClient | None = None

        async def handshake() -> AsyncClient:
            nonlocal client
            conn = await transport.connect(
                url, max_frame_bytes=limits.max_payload_bytes + limits.max_meta_bytes + 4096
            )
            client = cls(conn, plugins.build(serializer), limits)
            client._reader = asyncio.create_task(client._read_loop())
            welcome = await client.request(Op.HELLO, meta={"token": token or ""})
            client.info = dict(welcome.meta)
            return client

        try:
            return await asyncio.wait_for(handshake(), timeout)
        except TimeoutError:
            if client is not None:
                await client.close()
            raise ConnectionClosed(
                f"no answer from {url} within {timeout:g} s of connecting (is a djinn server listening there?)"
            ) from None
        except BaseException:
            if client is not None:
                await client.close()
            raise

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = decode_frame(await self._conn.recv(), self._serializer, self._limits)
                if frame.op is Op.BREAK and frame.request_id in self._breaks:
                    self._breaks[frame.request_id].put_nowait(frame)
                    continue
                if frame.op is Op.TOKEN:
                    stream = self._streams.get(frame.request_id)
                    if stream is not None:
                        stream.put_nowait(frame)
                    continue
                future = self._pending.pop(frame.request_id, None)
                if future is not None and not future.done():
                    future.set_result(frame)
        except asyncio.CancelledError:
            self._closed_error = ConnectionClosed("connection closed")
        except Exception as exc:  # noqa: BLE001 - whatever ended the stream ends every waiting request
            self._closed_error = exc if isinstance(exc, ConnectionClosed) else ConnectionClosed(
                f"the connection failed: {exc}")
        finally:
            error = self._closed_error or ConnectionClosed("connection closed")
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            for queue in [*self._breaks.values(), *self._streams.values()]:
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
                      tensors: Sequence[torch.Tensor] = (), timeout: float | None = None) -> Frame:
        """Send a request and wait for its reply; an ERROR reply raises the matching DjinnError.

        Past ``timeout`` seconds it raises ``RequestTimeout``; a reply that comes later is
        dropped. Cancelling the waiting task works the same way: nothing more is sent.
        """
        request_id, future = self._new_request()
        try:
            await self.send(op, session_id=session_id, meta=meta, tensors=tensors, request_id=request_id)
            reply = await _within(future, timeout, op.name)
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


async def _within(awaitable: Any, timeout: float | None, what: str) -> Any:
    """Await ``awaitable``, raising ``RequestTimeout`` after ``timeout`` seconds (None: no limit)."""
    if timeout is None:
        return await awaitable
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        raise RequestTimeout(f"{what} got no reply within {timeout:g} s") from None


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
    """Text, or token ids as an int64 tensor; anything else (a float id, say) is refused here."""
    if isinstance(inputs, str):
        return {"text": inputs}, ()
    if isinstance(inputs, torch.Tensor):
        if inputs.is_floating_point() or inputs.is_complex() or inputs.dtype is torch.bool:
            raise SessionError(f"token ids must be integers, not a {inputs.dtype} tensor")
        ids = inputs
    else:
        ids_list = list(inputs)
        bad = [t for t in ids_list if not isinstance(t, int) or isinstance(t, bool)]
        if bad:
            raise SessionError(f"token ids must be integers, not {bad[0]!r}")
        ids = torch.tensor(ids_list, dtype=torch.int64)
    return {}, (ids.reshape(-1).to(torch.int64),)


def _generate_meta(
    max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None,
    stop: Sequence[str | Sequence[int]] | None, ignore_eos: bool, logprobs: int | None,
) -> dict[str, Any]:
    """A GENERATE frame's arguments; the server checks each again."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise SessionError(f"max_new_tokens must be an integer >= 0, not {max_new_tokens!r}")
    meta: dict[str, Any] = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k}
    if top_p != 1.0:
        meta["top_p"] = top_p
    if seed is not None:
        meta["seed"] = seed
    if stop:
        meta["stop"] = [s if isinstance(s, str) else [int(t) for t in s] for s in ([stop] if isinstance(stop, str) else stop)]
    if ignore_eos:
        meta["ignore_eos"] = True
    if logprobs is not None:
        meta["logprobs"] = logprobs
    return meta


def _generation(reply: Frame) -> Generation:
    tokens = reply.tensors[0].tolist() if reply.tensors else []
    timings = {k: v for k, v in reply.meta.items() if k.endswith("_s")}
    return Generation(
        tokens=tokens, text=reply.meta.get("text"), timings=timings,
        finish_reason=reply.meta.get("finish_reason", "length"),
        cached_tokens=int(reply.meta.get("cached_tokens", 0)),
        logprobs=_logprobs(reply.meta.get("logprobs")),
    )


class AsyncSession:
    """One conversation's server-resident state."""

    def __init__(self, client: AsyncClient, session_id: int) -> None:
        self.client = client
        self.id = session_id

    async def generate(
        self, inputs: Inputs, max_new_tokens: int = 16, *, temperature: float = 0.0, top_k: int = 0,
        top_p: float = 1.0, seed: int | None = None, stop: Sequence[str | Sequence[int]] | None = None,
        ignore_eos: bool = False, logprobs: int | None = None, breakpoints: Sequence[int | tuple[int, str]] = (),
        on_break: Callable[[AsyncBreakpoint], Awaitable[None]] | None = None, timeout: float | None = None,
    ) -> Generation:
        """Append ``inputs`` (text or token ids) and generate; greedy unless ``temperature`` > 0.

        The session continues after the last generated token: the next request needs only the
        new input. It stops after ``max_new_tokens``, at the tokenizer's end-of-sequence token
        (unless ``ignore_eos``) or at a ``stop`` sequence (token-id lists, or strings when the
        model has a tokenizer). ``logprobs=k`` returns each token's log-probability and the k
        most likely tokens'. With ``breakpoints``, ``on_break(hit)`` is awaited at every hit; the
        pass resumes when it returns. ``timeout`` (seconds) raises ``RequestTimeout``.
        """
        if not breakpoints:
            meta, tensors = self._meta(inputs, max_new_tokens, temperature, top_k, top_p, seed, stop,
                                       ignore_eos, logprobs)
            reply = await self.client.request(Op.GENERATE, session_id=self.id, meta=meta, tensors=tensors,
                                              timeout=timeout)
            return _generation(reply)
        trace = self.trace(inputs, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                           stop=stop, ignore_eos=ignore_eos, logprobs=logprobs, breakpoints=breakpoints)

        async def run() -> Generation:
            async for hit in trace:
                if on_break is not None:
                    await on_break(hit)
            return trace.result

        return await _within(run(), timeout, "GENERATE")

    def _meta(self, inputs: Inputs, *args: Any) -> tuple[dict[str, Any], tuple[torch.Tensor, ...]]:
        meta, tensors = _input_frame(inputs)
        meta.update(_generate_meta(*args))
        return meta, tensors

    def stream(
        self, inputs: Inputs, max_new_tokens: int = 16, *, temperature: float = 0.0, top_k: int = 0,
        top_p: float = 1.0, seed: int | None = None, stop: Sequence[str | Sequence[int]] | None = None,
        ignore_eos: bool = False, logprobs: int | None = None,
    ) -> AsyncTokenStream:
        """Generate as ``generate`` does, as an async iterator of token ids as they are picked;
        ``.result`` (a ``Generation``) once it ends."""
        meta, tensors = self._meta(inputs, max_new_tokens, temperature, top_k, top_p, seed, stop,
                                   ignore_eos, logprobs)
        meta["stream"] = True
        return AsyncTokenStream(self, meta, tensors)

    def trace(
        self, inputs: Inputs, max_new_tokens: int = 16, *, temperature: float = 0.0, top_k: int = 0,
        top_p: float = 1.0, seed: int | None = None, stop: Sequence[str | Sequence[int]] | None = None,
        ignore_eos: bool = False, logprobs: int | None = None, breakpoints: Sequence[int | tuple[int, str]] = (),
    ) -> AsyncTrace:
        """Generate with breakpoints as an async iterator of hits; ``.result`` once it ends.

        A breakpoint is a layer index (pause after that layer) or ``(layer, at)`` with ``at``
        "attention" or "mlp": pause inside the layer once that block's output is computed, before
        it is added to the residual stream (the hit's activation is that output).
        """
        points = []
        for point in breakpoints:
            if isinstance(point, int) and not isinstance(point, bool):
                points.append(point)
            elif (isinstance(point, tuple) and len(point) == 2 and isinstance(point[0], int)
                  and not isinstance(point[0], bool) and isinstance(point[1], str)):
                points.append({"layer": point[0], "at": point[1]})
            else:
                raise SessionError("breakpoints must be layer indices or (layer, at) pairs")
        meta, tensors = self._meta(inputs, max_new_tokens, temperature, top_k, top_p, seed, stop,
                                   ignore_eos, logprobs)
        meta["breakpoints"] = points
        return AsyncTrace(self, meta, tensors)

    async def signal_phase(self, phase: str, expected_s: float | None = None) -> None:
        """Tell the server what this agent does next (``IO_WAIT`` or ``COMPUTE``); returns at once.

        An unknown phase raises ``SessionError`` naming the valid ones, before anything is sent.
        """
        valid = [p.value for p in Phase]
        if phase not in valid:
            raise SessionError(f"{phase!r} is not a phase; valid phases: {', '.join(valid)}")
        meta: dict[str, Any] = {"phase": phase, "reply": False}
        if expected_s is not None:
            if not isinstance(expected_s, (int, float)) or isinstance(expected_s, bool) or expected_s < 0:
                raise SessionError(f"expected_s must be a number >= 0, not {expected_s!r}")
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
        self._request_id, self._queue, self._reply = _start_generate(
            self.session, self.session.client._breaks, self._meta, self._tensors)

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
        self._result = _generation(reply)
        raise StopAsyncIteration


def _start_generate(
    session: AsyncSession, queues: dict[int, asyncio.Queue], meta: dict[str, Any], tensors: tuple[torch.Tensor, ...],
) -> tuple[int, asyncio.Queue, asyncio.Task]:
    """Send a GENERATE whose in-between frames (BREAK or TOKEN) go to a queue of its own in
    ``queues``; the queue gets None once the reply task is done. Returns the request id, the
    queue and the reply task."""
    client = session.client
    request_id, future = client._new_request()
    queue: asyncio.Queue = asyncio.Queue()
    queues[request_id] = queue

    async def finish() -> Frame:
        try:
            await client.send(Op.GENERATE, session_id=session.id, meta=meta, tensors=tensors, request_id=request_id)
            return await future
        finally:
            client._pending.pop(request_id, None)

    reply = asyncio.create_task(finish())
    reply.add_done_callback(_retrieve)
    reply.add_done_callback(lambda _t: queue.put_nowait(None))
    return request_id, queue, reply


def _retrieve(task: asyncio.Task) -> None:
    """Mark a background request's failure as seen: whoever iterates reports it, and a request
    abandoned after a lost connection logs no "exception was never retrieved"."""
    if not task.cancelled():
        task.exception()


class AsyncTokenStream:
    """Async iterator over a streaming generate's token ids as the server picks them."""

    def __init__(self, session: AsyncSession, meta: dict[str, Any], tensors: tuple[torch.Tensor, ...]) -> None:
        self.session = session
        self._meta, self._tensors = meta, tensors
        self._queue: asyncio.Queue | None = None
        self._reply: asyncio.Task | None = None
        self._buffered: list[int] = []
        self._result: Generation | None = None

    @property
    def result(self) -> Generation:
        """The generation, once iteration has ended."""
        if self._result is None:
            raise SessionError("the stream has not finished")
        return self._result

    def __aiter__(self) -> AsyncTokenStream:
        return self

    async def _start(self) -> None:
        self._request_id, self._queue, self._reply = _start_generate(
            self.session, self.session.client._streams, self._meta, self._tensors)

    async def __anext__(self) -> int:
        if self._queue is None:
            await self._start()
        while not self._buffered:
            if self._result is not None:
                raise StopAsyncIteration
            item = await self._queue.get()
            if isinstance(item, Frame):
                self._buffered.extend(int(t) for t in item.meta.get("tokens", []))
                continue
            self.session.client._streams.pop(self._request_id, None)
            if isinstance(item, BaseException):
                raise item
            reply = await self._reply
            raise_for_error(reply)
            self._result = _generation(reply)
        return self._buffered.pop(0)

    async def aclose(self) -> None:
        """Stop listening; the server finishes the request and its reply is dropped."""
        if self._reply is not None and not self._reply.done():
            self._reply.cancel()
            await asyncio.gather(self._reply, return_exceptions=True)
        if self._queue is not None:
            self.session.client._streams.pop(self._request_id, None)


class AsyncBreakpoint:
    """A forward pass paused after a layer. The activation stays on the server until fetched.

    Edits (``set``, ``scale``, ``add``) are checked here at once and sent with the next request of
    this breakpoint, in order: ``stats()`` and ``fetch()`` see them, and ``resume()`` carries them,
    so any number of edits and the resume take one round trip.
    """

    def __init__(self, session: AsyncSession, meta: dict[str, Any]) -> None:
        self.session = session
        self.layer: int = meta["layer"]
        #: "output" (after the layer), or "attention" / "mlp" (inside it)
        self.at: str = meta.get("at", "output")
        self.step: int = meta["step"]
        self.phase: str = meta["phase"]
        self.shape: tuple[int, ...] = tuple(meta["shape"])
        self.dtype: str = meta["dtype"]
        self.resumed = False
        self._edits: list[dict[str, Any]] = []
        self._edit_tensors: list[torch.Tensor] = []

    async def _call(self, op: Op, meta: dict[str, Any] | None = None) -> Frame:
        if self.resumed:
            raise BreakpointError("this breakpoint has been resumed")
        meta = {**(meta or {}), "edits": self._edits} if self._edits else meta
        tensors, self._edits, self._edit_tensors = tuple(self._edit_tensors), [], []  # sent once, taken or refused
        return await self.session.client.request(op, session_id=self.session.id, meta=meta, tensors=tensors)

    def _queue(self, kind: str, value: torch.Tensor | float) -> None:
        """Check one edit and keep it for the next request."""
        if self.resumed:
            raise BreakpointError("this breakpoint has been resumed")
        if kind == "scale":
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise BreakpointError(f"scale needs a number, not {type(value).__name__}")
            self._edits.append({"op": kind, "factor": float(value)})
            return
        check_edit_tensor(kind, tuple(value.shape), value.dtype, self.shape)
        self._edits.append({"op": kind, "tensor": len(self._edit_tensors)})
        self._edit_tensors.append(value.detach().cpu())

    async def stats(self) -> dict[str, Any]:
        """mean, std, min, max and norm of the activation, computed on the server."""
        return dict((await self._call(Op.INSPECT, {"what": "stats"})).meta)

    async def fetch(self) -> torch.Tensor:
        """The activation [1, T, hidden] as a CPU tensor (a copy you may modify)."""
        return (await self._call(Op.INSPECT, {"what": "fetch"})).tensors[0].clone()

    async def set(self, value: torch.Tensor) -> None:
        """Replace the activation (same shape), with the next request."""
        self._queue("set", value)

    async def scale(self, factor: float) -> None:
        """Multiply the activation by ``factor`` on the server, with the next request."""
        self._queue("scale", factor)

    async def add(self, vector: torch.Tensor) -> None:
        """Add a steering vector [hidden] (or a full [1, T, hidden] tensor) on the server, with the next request."""
        self._queue("add", vector)

    async def resume(self) -> None:
        """Let the forward pass continue (after the edits not yet sent)."""
        await self._call(Op.RESUME)
        self.resumed = True


class _Connecting:
    """What ``connect_async`` returns: await it for the client, or use it as ``async with``."""

    def __init__(self, url: str, token: str | None, kwargs: dict[str, Any]) -> None:
        self._args = (url, token, kwargs)
        self._client: AsyncClient | None = None

    def __await__(self):
        url, token, kwargs = self._args
        return AsyncClient.connect(url, token, **kwargs).__await__()

    async def __aenter__(self) -> AsyncClient:
        self._client = await self
        return self._client

    async def __aexit__(self, *exc: Any) -> None:
        if self._client is not None:
            await self._client.close()


def connect_async(url: str, token: str | None = None, **kwargs: Any) -> _Connecting:
    """Connect to a Djinn server at ``url`` (``tcp://host:port``, ``inproc://name``, ``ucx://...``):
    ``client = await connect_async(url)`` or ``async with connect_async(url) as client``.

    ``timeout`` (default 10 s) bounds the connect and the HELLO; None waits for ever.
    """
    return _Connecting(url, token, kwargs)
