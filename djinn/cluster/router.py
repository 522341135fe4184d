"""The router: one native-protocol endpoint in front of many Djinn servers.

A client connects to the router exactly as it would to a server (HELLO, then frames). The router
opens, for each client connection, one connection of its own to each server that holds one of
that client's sessions, so a server sees each client as one connection and frees its sessions
when it goes, as it always does. Every session lives on one server (affinity): its GENERATE,
SIGNAL_PHASE, breakpoint frames and CLOSE_SESSION go there and nowhere else, in the order the
client sent them, readdressed (the router's session id becomes the server's; request ids become
the router's own on that connection) and otherwise forwarded as they came: the router decodes
and validates every client frame (``decode_frame``: nothing is unpickled) but re-encodes only a
GENERATE that must carry a migrated session's pending token.

New sessions go where admission is cheapest (``placement.pick_server`` over each server's
reported load). When a server runs out of memory while another has room, the router moves an
idle (IO_WAIT, nothing in flight) session: the owner exports its KV and tokens, the bytes travel
as the node handles carry them (Ray's object store between actors), the new owner imports them
into a session opened on the client's connection there, and the old one is closed. Frames the
client sends meanwhile wait and then go to the new owner. A server that dies fails only the
sessions it held: their requests in flight and every later one get a ``SessionError`` that
names the server; the other sessions, of the same client too, go on.

Header rewriting relies on the frame layout that ``djinn.wire.frames`` specifies: session id
and request id are the two little-endian u64 at offsets 8 and 16.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import struct
import time
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs

from djinn import __version__
from djinn.cluster import placement
from djinn.kernel.errors import DjinnError, SessionError
from djinn.kernel.strategies import Phase
from djinn.wire.contracts import Connection
from djinn.wire.errors import AuthError, ConnectionClosed, FrameError
from djinn.wire.frames import (
    HEADER_SIZE,
    Frame,
    Op,
    WireLimits,
    decode_frame,
    encode_frame,
    error_frame,
    peek_header,
    raise_for_error,
)

log = logging.getLogger(__name__)

#: session id and request id in a frame header (see ``djinn.wire.frames``)
_IDS = struct.Struct("<QQ")
_IDS_OFFSET = 8

#: replies that end a request; TOKEN and BREAK come before one of them
_FINAL = (Op.RESULT, Op.OK, Op.ERROR)
_SESSION_OPS = (Op.GENERATE, Op.SIGNAL_PHASE, Op.CLOSE_SESSION, Op.INSPECT, Op.EDIT, Op.RESUME)
_PHASES = frozenset(p.value for p in Phase)


def readdressed(buf: memoryview, session_id: int, request_id: int) -> list[Any]:
    """``buf`` (one whole frame) with new session and request ids: a new header, the rest as is."""
    header = bytearray(buf[:HEADER_SIZE])
    _IDS.pack_into(header, _IDS_OFFSET, session_id, request_id)
    return [bytes(header), buf[HEADER_SIZE:]]


class NodeHandle(Protocol):
    """The control calls the router makes on one server (``DjinnNode``'s, awaited)."""

    async def load(self) -> dict[str, Any]:
        """``DjinnNode.load()``."""

    async def export_session(self, session_id: int) -> tuple[dict[str, Any], Any]:
        """The session's state and its KV bytes, or a reference to them the import takes."""

    async def import_session(self, session_id: int, state: dict[str, Any], kv: Any) -> float:
        """``DjinnNode.import_session``."""

    async def tokenize(self, text: str) -> list[int]:
        """``DjinnNode.tokenize``."""


@attrs.frozen
class RouterSettings:
    """How the router places, watches and moves sessions."""

    #: seconds between reading every server's load (and deciding migrations)
    poll_s: float = attrs.field(default=0.25, validator=attrs.validators.gt(0))
    #: a placement reads loads again when the last reading is older than this
    load_max_age_s: float = attrs.field(default=0.1, validator=attrs.validators.ge(0))
    #: a server is under pressure below this share of its capacity free (see ``placement``)
    low_water: float = attrs.field(default=0.1, validator=[attrs.validators.ge(0), attrs.validators.lt(0.5)])
    #: move idle sessions off servers under pressure
    migrate: bool = True
    #: seconds a control call (load, export, import) may take before its server counts as gone
    call_timeout_s: float = attrs.field(default=120.0, validator=attrs.validators.gt(0))
    max_frame_mb: int = attrs.field(default=1024, validator=attrs.validators.gt(0))
    #: requests of one client connection in flight at once; its further frames wait unread
    max_requests_per_connection: int = attrs.field(default=256, validator=attrs.validators.gt(0))
    hello_timeout_s: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))


@attrs.define(eq=False)
class Backend:
    """One server behind the router."""

    name: str
    url: str
    node: NodeHandle
    #: its OpenAI API's base URL (``http://host:port``), or "" when it serves none
    http_url: str = ""
    welcome: dict[str, Any] = attrs.Factory(dict)
    load: placement.ServerLoad | None = None
    load_at: float = 0.0
    #: sessions placed here since ``load`` was read
    placed_since: int = 0
    alive: bool = True
    gone_reason: str = ""


@attrs.frozen
class Migration:
    """One finished move: which session, from and to which server, how many bytes, how long."""

    session_id: int
    source: str
    target: str
    nbytes: int
    export_s: float
    import_s: float
    total_s: float


@attrs.define(eq=False)
class _Request:
    """A forwarded request waiting for its final reply."""

    client_request_id: int
    session: RoutedSession
    op: Op


@attrs.define(eq=False)
class RoutedSession:
    """A client's session as the router sees it."""

    id: int
    client: RouterClient
    backend: Backend
    upstream_id: int
    phase: str = Phase.COMPUTE.value
    expected_at: float | None = None
    #: requests forwarded and not answered yet
    inflight: int = 0
    #: tokens to put in front of the next GENERATE's input (a migrated session's pending token)
    carry: list[int] = attrs.Factory(list)
    #: why the session is gone (its server died), else ""
    lost: str = ""
    closed: bool = False
    #: done when the last frame or move queued for this session has gone out (keeps their order)
    tail: asyncio.Future | None = None


class _Turn:
    """A place in a session's line: entered once everything queued before it has gone out.
    The place is taken when the object is made (synchronously, as a frame arrives), so frames
    and moves keep their arrival order; ``release`` (idempotent) lets the next one go."""

    def __init__(self, session: RoutedSession) -> None:
        self.previous = session.tail
        self.mine = asyncio.get_running_loop().create_future()
        session.tail = self.mine

    async def __aenter__(self) -> None:
        if self.previous is not None and not self.previous.done():
            await asyncio.shield(self.previous)

    async def __aexit__(self, *exc: Any) -> None:
        self.release()

    def release(self, *_: Any) -> None:
        if self.mine.done():
            return
        if self.previous is not None and not self.previous.done():  # left before its turn: keep the line
            self.previous.add_done_callback(lambda _f: self.mine.done() or self.mine.set_result(None))
        else:
            self.mine.set_result(None)


class Upstream:
    """The router's connection to one server on behalf of one client connection."""

    def __init__(self, router: Router, client: RouterClient, backend: Backend, conn: Connection) -> None:
        self.router, self.client, self.backend, self.conn = router, client, backend, conn
        self._ids = itertools.count(1)
        self.forwarded: dict[int, _Request] = {}
        self._waiting: dict[int, asyncio.Future] = {}
        self.reader: asyncio.Task | None = None
        self.closed = False

    async def handshake(self, token: str | None) -> dict[str, Any]:
        """HELLO; the server's WELCOME meta. Starts reading replies."""
        self.reader = asyncio.create_task(self._read_loop())
        return dict((await self.request(Op.HELLO, meta={"token": token or ""})).meta)

    def new_id(self) -> int:
        return next(self._ids)

    async def request(self, op: Op, *, session_id: int = 0, meta: dict[str, Any] | None = None) -> Frame:
        """A request of the router's own (not a client's); its reply, an ERROR raised."""
        if self.closed:
            raise ConnectionClosed(f"the connection to server {self.backend.name} is closed")
        request_id = self.new_id()
        future = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            await self.conn.send(encode_frame(Frame(op, session_id, request_id, meta or {}), self.router.serializer))
            reply = await asyncio.wait_for(future, self.router.settings.call_timeout_s)
        finally:
            self._waiting.pop(request_id, None)
        raise_for_error(reply)
        return reply

    async def _read_loop(self) -> None:
        reason = "its connection closed"
        try:
            while True:
                buf = await self.conn.recv()
                op, _session_id, request_id = peek_header(buf)
                waiter = self._waiting.pop(request_id, None)
                if waiter is not None:
                    if not waiter.done():
                        waiter.set_result(decode_frame(buf, self.router.serializer, self.router.limits))
                    continue
                request = self.forwarded.get(request_id)
                if request is None:
                    continue  # the reply to a request nobody waits for (a signal without reply)
                if op in _FINAL:
                    del self.forwarded[request_id]
                    request.session.inflight -= 1
                    if op is Op.OK and request.op is Op.CLOSE_SESSION:
                        self.router._forget(request.session)
                await self.client.send(readdressed(buf, request.session.id, request.client_request_id))
        except asyncio.CancelledError:
            reason = "the router closed its connection"
            raise
        except ConnectionClosed as exc:
            reason = f"its connection closed ({exc})" if str(exc) else reason
        except Exception as exc:  # noqa: BLE001 - whatever ends this stream ends its sessions
            reason = f"its connection failed ({type(exc).__name__}: {exc})"
            log.exception("reading from server %s failed", self.backend.name)
        finally:
            self.closed = True
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionClosed(f"server {self.backend.name}: {reason}"))
            if self.client.upstreams.get(self.backend.name) is self:
                await self.router._upstream_lost(self, reason)

    async def close(self) -> None:
        self.closed = True
        with contextlib.suppress(Exception):
            await self.conn.close()
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)


@attrs.define(eq=False)
class RouterClient:
    """One client connection to the router."""

    conn: Connection
    router: Router
    sessions: dict[int, RoutedSession] = attrs.Factory(dict)
    upstreams: dict[str, Upstream] = attrs.Factory(dict)
    opening: dict[str, asyncio.Lock] = attrs.Factory(dict)
    tasks: set[asyncio.Task] = attrs.Factory(set)
    #: the client went away: no connection to a server is opened for it any more
    closed: bool = False

    async def send(self, parts: Sequence[Any]) -> None:
        """Send one frame's buffers; a client that went away is not an error here."""
        with contextlib.suppress(ConnectionClosed, OSError):
            await self.conn.send(parts)

    async def upstream(self, backend: Backend) -> Upstream:
        """This client's connection to ``backend``, opened on first use."""
        lock = self.opening.setdefault(backend.name, asyncio.Lock())
        async with lock:
            if self.closed:  # a move finishing after its client left must not open a session for nobody
                raise ConnectionClosed("the client has disconnected")
            existing = self.upstreams.get(backend.name)
            if existing is not None and not existing.closed:
                return existing
            conn = await self.router.connect(backend.url)
            upstream = Upstream(self.router, self, backend, conn)
            self.upstreams[backend.name] = upstream
            try:
                await upstream.handshake(self.router.server_token)
            except BaseException:
                self.upstreams.pop(backend.name, None)
                await upstream.close()
                raise
            return upstream


class Router:
    """Serves the native protocol for many servers (``backends``); see the module docstring.

    ``transports`` are the transport strategies by URL scheme (the router listens and connects
    with them), ``serializer`` the one its servers use. ``token`` is what clients must present,
    ``server_token`` what the router presents to its servers.
    """

    def __init__(self, backends: Sequence[Backend], *, transports: dict[str, Any], serializer: Any,
                 token: str | None = None, server_token: str | None = None,
                 settings: RouterSettings = RouterSettings()) -> None:
        if not backends:
            raise ValueError("a router needs at least one server")
        self.backends = {b.name: b for b in backends}
        if len(self.backends) != len(backends):
            raise ValueError("server names must be unique")
        self.transports, self.serializer = transports, serializer
        self.token, self.server_token, self.settings = token, server_token, settings
        self.limits = WireLimits(max_payload_bytes=settings.max_frame_mb << 20)
        self.max_frame_bytes = self.limits.max_payload_bytes + self.limits.max_meta_bytes + 4096
        self.sessions: dict[int, RoutedSession] = {}
        self.clients: set[RouterClient] = set()
        self.migrations: list[Migration] = []
        self.counters = {"sessions_placed": 0, "sessions_lost": 0, "migrations": 0, "migration_failures": 0,
                         "frames_forwarded": 0}
        self._ids = itertools.count(1)
        self._listeners: list[Any] = []
        self._refreshing: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        #: moves the watcher started, by the server each moves off (one at a time off each)
        self._moving: dict[asyncio.Task, str] = {}
        self.welcome: dict[str, Any] = {}

    # ------------------------------------------------------------------ life cycle

    def _transport(self, url: str) -> Any:
        scheme = urlsplit(url).scheme
        transport = self.transports.get(scheme)
        if transport is None:
            raise DjinnError(f"no transport for {scheme}:// in the router; it has {', '.join(self.transports)}")
        return transport

    async def connect(self, url: str) -> Connection:
        """A connection of the router's own to a server at ``url``."""
        return await self._transport(url).connect(url, max_frame_bytes=self.max_frame_bytes)

    async def _probe(self, backend: Backend) -> None:
        """Connect to ``backend`` once for its WELCOME (the model it serves); refuse another model."""
        conn = await self.connect(backend.url)
        probe = Upstream(self, RouterClient(conn, self), backend, conn)
        try:
            backend.welcome = await probe.handshake(self.server_token)
        finally:
            probe.closed = True
            await probe.close()
        model = self.welcome.get("model", backend.welcome.get("model"))
        if backend.welcome.get("model") != model:
            raise DjinnError(f"server {backend.name} serves {backend.welcome.get('model')!r}, the others {model!r}")

    async def start(self, urls: Sequence[str]) -> list[str]:
        """Check every server answers with the same model, read their loads, listen on ``urls``."""
        for backend in self.backends.values():
            await self._probe(backend)
        models = {b.welcome.get("model") for b in self.backends.values()}
        if len(models) != 1:
            raise DjinnError(f"the servers serve different models: {sorted(map(str, models))}")
        first = next(iter(self.backends.values()))
        self.welcome = {**first.welcome, "server": f"djinn-router {__version__}",
                        "servers": sorted(self.backends)}
        await self.refresh_loads()
        bound = []
        for url in urls:
            listener = await self._transport(url).listen(url, self._serve_client, max_frame_bytes=self.max_frame_bytes)
            self._listeners.append(listener)
            bound.append(listener.url)
        self._watcher = asyncio.create_task(self._watch(), name="djinn-router-watch")
        return bound

    async def add_backend(self, backend: Backend) -> None:
        """Put one more server behind the running router (it takes new sessions at once)."""
        if backend.name in self.backends:
            raise ValueError(f"a server named {backend.name!r} is already behind the router")
        await self._probe(backend)
        self.backends[backend.name] = backend
        self.welcome["servers"] = sorted(self.backends)
        await self.refresh_loads()

    async def close(self) -> None:
        """Stop listening and watching; close every client's connections to the servers."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        for task in list(self._moving):
            task.cancel()
        await asyncio.gather(*self._moving, return_exceptions=True)
        for listener in self._listeners:
            await listener.close()
        for client in list(self.clients):
            await self._drop_client(client)
            with contextlib.suppress(Exception):
                await client.conn.close()

    # ------------------------------------------------------------------ loads and placement

    async def refresh_loads(self) -> None:
        """Read every live server's load (one reading at a time; callers share it)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._read_loads())
        await asyncio.shield(self._refreshing)

    async def _read_loads(self) -> None:
        alive = [b for b in self.backends.values() if b.alive]

        async def read(backend: Backend) -> None:
            try:
                report = await asyncio.wait_for(backend.node.load(), self.settings.call_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a server that cannot answer is gone
                self._backend_gone(backend, f"it did not answer ({type(exc).__name__}: {exc})")
                return
            backend.load, backend.load_at, backend.placed_since = placement.ServerLoad.from_report(report), \
                time.monotonic(), 0

        await asyncio.gather(*(read(b) for b in alive))

    async def place(self) -> Backend:
        """The live server where a new session is admitted most cheaply."""
        alive = [b for b in self.backends.values() if b.alive]
        if alive and min(b.load_at for b in alive) < time.monotonic() - self.settings.load_max_age_s:
            await self.refresh_loads()
        loads = {b.name: b.load for b in self.backends.values() if b.alive and b.load is not None}
        if not loads:
            raise SessionError("no server of the cluster is up")
        name = placement.pick_server(loads, {n: self.backends[n].placed_since for n in loads})
        return self.backends[name]

    def _backend_gone(self, backend: Backend, reason: str) -> None:
        lines = [line.strip() for line in reason.splitlines() if line.strip()]
        reason = lines[0] if len(lines) < 2 else f"{lines[0]} {lines[-1]}"  # Ray's errors run to many lines
        if backend.alive:
            log.error("server %s is gone: %s", backend.name, reason)
        backend.alive, backend.gone_reason = False, reason

    # ------------------------------------------------------------------ clients

    async def _serve_client(self, conn: Connection) -> None:
        client = RouterClient(conn, self)
        try:
            if not await self._hello(client):
                return
            self.clients.add(client)
            limit = self.settings.max_requests_per_connection
            while True:
                while len(client.tasks) >= limit:  # back-pressure, as a server applies it
                    await asyncio.wait(set(client.tasks), return_when=asyncio.FIRST_COMPLETED)
                buf = await conn.recv()
                try:
                    frame = decode_frame(buf, self.serializer, self.limits)
                except FrameError as exc:
                    await self._refuse(client, buf, exc)
                    continue
                self._dispatch(client, frame, buf)
        except ConnectionClosed:
            pass
        except FrameError as exc:  # too large: the stream is out of sync
            await client.send(encode_frame(error_frame(0, 0, exc), self.serializer))
        except Exception:
            log.exception("client connection %s failed", getattr(conn, "peer", "?"))
        finally:
            await self._drop_client(client)
            with contextlib.suppress(Exception):
                await conn.close()

    async def _hello(self, client: RouterClient) -> bool:
        client.conn.max_frame_bytes = HEADER_SIZE + self.limits.max_meta_bytes
        try:
            buf = await asyncio.wait_for(client.conn.recv(), self.settings.hello_timeout_s)
            frame = decode_frame(buf, self.serializer, self.limits)
        except TimeoutError:
            await self._error(client, 0, 0, AuthError("no HELLO in time"))
            return False
        except FrameError as exc:
            await self._error(client, 0, 0, exc)
            return False
        given = frame.meta.get("token") or ""
        if frame.op is not Op.HELLO:
            refusal: DjinnError | None = AuthError("the first frame must be HELLO")
        elif self.token is not None and not (
                isinstance(given, str) and hmac.compare_digest(given.encode(), self.token.encode())):
            refusal = AuthError("wrong or missing token")
        else:
            refusal = None
        if refusal is not None:
            await self._error(client, frame.request_id, 0, refusal)
            return False
        client.conn.max_frame_bytes = self.max_frame_bytes
        await client.send(encode_frame(Frame(Op.WELCOME, request_id=frame.request_id, meta=self.welcome),
                                       self.serializer))
        return True

    async def _error(self, client: RouterClient, request_id: int, session_id: int, exc: BaseException) -> None:
        await client.send(encode_frame(error_frame(request_id, session_id, exc), self.serializer))

    async def _refuse(self, client: RouterClient, buf: memoryview, exc: FrameError) -> None:
        try:
            _op, session_id, request_id = peek_header(buf)
        except FrameError:
            session_id = request_id = 0
        await self._error(client, request_id, session_id, exc)

    def _spawn(self, client: RouterClient, coro: Any) -> asyncio.Task:
        task = asyncio.create_task(coro)
        client.tasks.add(task)
        task.add_done_callback(client.tasks.discard)
        return task

    def _dispatch(self, client: RouterClient, frame: Frame, buf: memoryview) -> None:
        op = frame.op
        if op is Op.PING:
            self._spawn(client, client.send(encode_frame(Frame(Op.OK, request_id=frame.request_id), self.serializer)))
        elif op is Op.STATUS:
            self._spawn(client, self._status(client, frame))
        elif op is Op.OPEN_SESSION:
            self._spawn(client, self._open_session(client, frame))
        elif op in _SESSION_OPS:
            session = client.sessions.get(frame.session_id)
            if session is None:
                error = SessionError(f"no open session {frame.session_id} on this connection")
                self._spawn(client, self._error(client, frame.request_id, frame.session_id, error))
                return
            # its place in line is taken now, in arrival order: a session's frames leave in the
            # order they came, and a move waits for those before it
            turn = _Turn(session)
            self._spawn(client, self._forward(session, frame, buf, turn)).add_done_callback(turn.release)
        else:
            error = FrameError(f"op {op.name} is not a request")
            self._spawn(client, self._error(client, frame.request_id, frame.session_id, error))

    async def _status(self, client: RouterClient, frame: Frame) -> None:
        await self.refresh_loads()
        await client.send(encode_frame(Frame(Op.RESULT, request_id=frame.request_id, meta=self.status()),
                                       self.serializer))

    def status(self) -> dict[str, Any]:
        """The cluster as the router sees it: every server's load, sessions, moves, counters."""
        servers = {}
        for b in self.backends.values():
            load = b.load
            servers[b.name] = {
                "url": b.url, "alive": b.alive, "gone_reason": b.gone_reason,
                "sessions": sum(1 for s in self.sessions.values() if s.backend is b and not s.lost),
                **({} if load is None else {
                    "device_room_bytes": load.device_room, "room_bytes": load.room,
                    "capacity_bytes": load.capacity, "admission_queue": load.admission_queue}),
            }
        return {
            "router": f"djinn-router {__version__}", "servers": servers, "sessions": len(self.sessions),
            "counters": dict(self.counters),
            "migrations": [attrs.asdict(m) for m in self.migrations[-32:]],
        }

    async def _open_session(self, client: RouterClient, frame: Frame) -> None:
        try:
            backend = await self.place()
            upstream = await client.upstream(backend)
            reply = await upstream.request(Op.OPEN_SESSION)
        except Exception as exc:  # noqa: BLE001 - the client hears why
            if not isinstance(exc, DjinnError):
                exc = SessionError(f"no server could open a session: {type(exc).__name__}: {exc}")
            await self._error(client, frame.request_id, 0, exc)
            return
        session = RoutedSession(next(self._ids), client, backend, int(reply.meta["session_id"]))
        backend.placed_since += 1
        self.counters["sessions_placed"] += 1
        client.sessions[session.id] = session
        self.sessions[session.id] = session
        await client.send(encode_frame(
            Frame(Op.RESULT, request_id=frame.request_id, meta={"session_id": session.id}), self.serializer))

    async def _forward(self, session: RoutedSession, frame: Frame, buf: memoryview, turn: _Turn) -> None:
        async with turn:
            client = session.client
            if session.lost:
                if frame.op is Op.CLOSE_SESSION:  # nothing is left to free
                    self._forget(session)
                    await client.send(encode_frame(Frame(Op.OK, session.id, frame.request_id), self.serializer))
                elif frame.op is not Op.SIGNAL_PHASE or frame.meta.get("reply", True):
                    await self._error(client, frame.request_id, session.id, SessionError(session.lost))
                return
            if frame.op is Op.SIGNAL_PHASE and frame.meta.get("phase") in _PHASES:
                session.phase = frame.meta["phase"]
                expected = frame.meta.get("expected_s")
                session.expected_at = (time.monotonic() + expected
                                       if isinstance(expected, (int, float)) and not isinstance(expected, bool)
                                       and expected >= 0 else None)
            upstream: Upstream | None = None
            replied = frame.op is not Op.SIGNAL_PHASE or frame.meta.get("reply", True)
            request_id = 0
            try:
                upstream = await client.upstream(session.backend)
                if replied:
                    request_id = upstream.new_id()
                    upstream.forwarded[request_id] = _Request(frame.request_id, session, frame.op)
                    session.inflight += 1
                if frame.op is Op.GENERATE and session.carry:
                    carried = await self._with_carry(session, frame)
                    parts = encode_frame(attrs.evolve(carried, session_id=session.upstream_id, request_id=request_id),
                                         self.serializer)
                    session.carry = []
                else:
                    parts = readdressed(buf, session.upstream_id, request_id)
                self.counters["frames_forwarded"] += 1
                await upstream.conn.send(parts)
            except Exception as exc:  # noqa: BLE001 - the request fails, the session goes on
                if upstream is not None and upstream.forwarded.pop(request_id, None) is not None:
                    session.inflight -= 1
                if isinstance(exc, (ConnectionClosed, OSError)):  # its server went before it noticed
                    exc = SessionError(f"server {session.backend.name} is gone ({exc}): session {session.id} "
                                       f"and its KV are lost")
                elif not isinstance(exc, DjinnError):
                    exc = SessionError(f"server {session.backend.name}: {type(exc).__name__}: {exc}")
                if replied:
                    await self._error(client, frame.request_id, session.id, exc)

    async def _with_carry(self, session: RoutedSession, frame: Frame) -> Frame:
        """A GENERATE with the migrated session's pending token(s) in front of its input ids."""
        import torch

        meta = dict(frame.meta)
        if frame.tensors:
            ids = frame.tensors[0].reshape(-1).to(torch.int64).tolist()
        elif isinstance(meta.get("text"), str):
            ids = await session.backend.node.tokenize(meta.pop("text"))
        else:
            ids = []
        tensor = torch.tensor([*session.carry, *ids], dtype=torch.int64)
        return attrs.evolve(frame, meta=meta, tensors=(tensor, *frame.tensors[1:]))

    def _forget(self, session: RoutedSession) -> None:
        session.closed = True
        session.client.sessions.pop(session.id, None)
        self.sessions.pop(session.id, None)

    async def _drop_client(self, client: RouterClient) -> None:
        client.closed = True
        self.clients.discard(client)
        for task in list(client.tasks):
            task.cancel()
        await asyncio.gather(*client.tasks, return_exceptions=True)
        for session in list(client.sessions.values()):
            self._forget(session)
        upstreams, client.upstreams = list(client.upstreams.values()), {}
        for upstream in upstreams:  # each server frees this client's sessions when its connection goes
            await upstream.close()

    async def _upstream_lost(self, upstream: Upstream, reason: str) -> None:
        """A connection to a server ended: every session of this client there is gone with it."""
        client, backend = upstream.client, upstream.backend
        client.upstreams.pop(backend.name, None)
        message = f"server {backend.name} is gone ({reason})"
        for request in list(upstream.forwarded.values()):
            await self._error(client, request.client_request_id, request.session.id,
                              SessionError(f"{message}: session {request.session.id} and its KV are lost"))
        upstream.forwarded.clear()
        for session in list(client.sessions.values()):
            if session.backend is backend and not session.lost:
                session.lost = f"{message}: session {session.id} and its KV are lost; open a new session"
                session.inflight = 0
                self.counters["sessions_lost"] += 1
        if backend.alive:
            asyncio.create_task(self.check_alive(backend))

    async def check_alive(self, backend: Backend) -> None:
        """Ask ``backend`` for its load; one that does not answer is marked gone."""
        try:
            await asyncio.wait_for(backend.node.load(), min(10.0, self.settings.call_timeout_s))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._backend_gone(backend, f"it did not answer ({type(exc).__name__}: {exc})")

    # ------------------------------------------------------------------ migration

    async def migrate(self, session_id: int, target: str | None = None, *, idle_only: bool = True) -> Migration:
        """Move the session ``session_id`` (the router's id) to ``target`` (default: the server
        where admission is cheapest, other than its own). It must have nothing in flight and,
        with ``idle_only``, be in IO_WAIT; frames that arrive meanwhile wait and follow it."""
        session = self.sessions.get(session_id)
        if session is None:
            raise SessionError(f"no open session {session_id}")
        if target is None:
            await self.refresh_loads()
            loads = {b.name: b.load for b in self.backends.values()
                     if b.alive and b is not session.backend and b.load is not None}
            if not loads:
                raise SessionError("no other server is up to take the session")
            target = placement.pick_server(loads)
        destination = self.backends.get(target)
        if destination is None or not destination.alive:
            raise SessionError(f"no live server {target!r}; servers: {', '.join(sorted(self.backends))}")
        async with _Turn(session):
            return await self._move(session, destination, idle_only)

    async def _move(self, session: RoutedSession, destination: Backend, idle_only: bool) -> Migration:
        source = session.backend
        if session.lost or session.closed:
            raise SessionError(session.lost or f"session {session.id} is closed")
        if destination is source:
            raise SessionError(f"session {session.id} is already on {source.name}")
        if session.inflight:
            raise SessionError(f"session {session.id} has a request in flight; only an idle session moves")
        if idle_only and session.phase != Phase.IO_WAIT.value:
            raise SessionError(f"session {session.id} is not in IO_WAIT")
        started = time.perf_counter()
        try:
            state, kv = await asyncio.wait_for(source.node.export_session(session.upstream_id),
                                               self.settings.call_timeout_s)
            exported = time.perf_counter()
            client = session.client
            upstream = await client.upstream(destination)
            new_id = int((await upstream.request(Op.OPEN_SESSION)).meta["session_id"])
            try:
                await asyncio.wait_for(destination.node.import_session(new_id, state, kv),
                                       self.settings.call_timeout_s)
            except BaseException:
                with contextlib.suppress(Exception):
                    await upstream.request(Op.CLOSE_SESSION, session_id=new_id)
                raise
        except BaseException:
            self.counters["migration_failures"] += 1
            raise
        imported = time.perf_counter()
        old = client.upstreams.get(source.name)
        old_id = session.upstream_id
        session.backend, session.upstream_id = destination, new_id
        session.carry = [*state["pending"], *session.carry]
        if old is not None:
            with contextlib.suppress(Exception):  # a gone source freed it already
                await old.request(Op.CLOSE_SESSION, session_id=old_id)
        move = Migration(session.id, source.name, destination.name, int(state["nbytes"]),
                         exported - started, imported - exported, time.perf_counter() - started)
        self.migrations.append(move)
        self.counters["migrations"] += 1
        log.info("moved session %d from %s to %s: %d bytes in %.3f s", session.id, source.name,
                 destination.name, move.nbytes, move.total_s)
        return move

    async def _watch(self) -> None:
        """Read loads every ``poll_s``; move idle sessions off servers under pressure."""
        while True:
            await asyncio.sleep(self.settings.poll_s)
            try:
                await self.refresh_loads()
                if self.settings.migrate:
                    self._rebalance()
            except Exception:
                log.exception("watching the servers failed; continuing")

    def _rebalance(self) -> None:
        loads = {b.name: b.load for b in self.backends.values() if b.alive and b.load is not None}
        busy_sources = set(self._moving.values())
        now = time.monotonic()
        for name, load in loads.items():
            if name in busy_sources or not placement.under_pressure(load, self.settings.low_water):
                continue
            backend = self.backends[name]
            candidates = []
            for session in self.sessions.values():
                if (session.backend is backend and not session.lost and not session.closed and not session.inflight
                        and session.phase == Phase.IO_WAIT.value):
                    reported = load.session(session.upstream_id)
                    if reported is not None and reported.kv_bytes and not reported.busy:
                        candidates.append((session, session.expected_at, reported.kv_bytes))
            for session in placement.coldest_first(candidates, now):
                size = load.session(session.upstream_id).kv_bytes
                target = placement.pick_target(loads, name, size, self.settings.low_water)
                if target is None:
                    continue
                task = asyncio.create_task(self._rebalance_one(session, self.backends[target]))
                self._moving[task] = name
                task.add_done_callback(lambda done: self._moving.pop(done, None))
                break

    async def _rebalance_one(self, session: RoutedSession, destination: Backend) -> None:
        try:
            async with _Turn(session):
                if session.inflight or session.phase != Phase.IO_WAIT.value or session.lost or session.closed:
                    return  # it woke up meanwhile: it stays
                await self._move(session, destination, idle_only=True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the session stays where it was
            log.warning("moving session %d to %s failed: %s", session.id, destination.name, exc)
