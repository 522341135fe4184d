"""The ``inproc`` transport: frames between event loops of one process, no sockets.

A process-wide table maps ``inproc://name`` to its listener. The two ends of a connection may
live on different event loops in different threads (a server loop in a background thread, a
client's loop in the main one): each frame is handed to the receiver's loop with
``call_soon_threadsafe``. There is no back-pressure: a sender is never made to wait, so frames
queue at the receiver until it reads them.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import threading
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from djinn.kernel.hookspecs import hookimpl
from djinn.wire.contracts import Buffer, Connection, ConnectionHandler, Transport
from djinn.plugins.transports._framing import (
    ServingListener,
    byte_views,
    check_frame_length,
    check_max_frame_bytes,
    new_frame_buffer,
)
from djinn.wire.errors import ConnectionClosed, FrameTooLarge

if TYPE_CHECKING:
    from djinn.kernel.plugins import StrategyRegistry

SCHEME = "inproc"

_listeners_lock = threading.Lock()
_listeners: dict[str, InprocListener] = {}
_connection_numbers = itertools.count(1)


@attrs.frozen
class InprocSettings:
    """The ``inproc`` transport has no settings; ``[settings.inproc]`` must stay empty."""


def _name_of(url: str) -> str:
    """``inproc://name`` -> ``name``."""
    prefix = f"{SCHEME}://"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ValueError(f"{url!r} is not an {SCHEME}://name URL")
    return url[len(prefix) :]


def _call_on(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> bool:
    """Run ``callback(*args)`` soon on ``loop``, from any thread; False when ``loop`` is closed."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    try:
        if running is loop:
            loop.call_soon(callback, *args)  # same loop: no need to wake it through its pipe
        else:
            loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop is closed
        return False
    return True


class InprocConnection(Connection):
    """One end of an in-process connection, used from the event loop it was created for.

    Frames and the peer's close arrive as callbacks on this end's loop, in the order sent.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, *, max_frame_bytes: int, peer: str
    ) -> None:
        """An end owned by ``loop``; ``pair`` joins two ends."""
        self.peer = peer
        self._loop = loop
        self.max_frame_bytes = max_frame_bytes
        self._other: InprocConnection | None = None
        self._frames: deque[memoryview | FrameTooLarge] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._recv_lock = asyncio.Lock()
        self._closed = False  # closed by this end
        self._peer_closed = False  # the other end's close has arrived on this loop

    @staticmethod
    def pair(one: InprocConnection, other: InprocConnection) -> None:
        """Join two fresh ends into one connection."""
        one._other, other._other = other, one

    async def send(self, parts: Sequence[Buffer]) -> None:
        """Copy ``parts`` into one new buffer and hand it to the other end's loop."""
        other = self._other
        assert other is not None, "an end is used only after pair()"
        if self._closed:
            raise ConnectionClosed(f"the connection to {self.peer} is closed")
        if self._peer_closed or other._closed:
            raise ConnectionClosed(f"{self.peer} closed the connection")
        views, total = byte_views(parts)
        item: memoryview | FrameTooLarge
        try:
            # checked here, before the copy, so an oversized frame costs nothing
            check_frame_length(total, other.max_frame_bytes)
        except FrameTooLarge as too_large:
            item = too_large
        else:
            # a copy: the caller may reuse its buffers once send returns, as with sockets
            item = new_frame_buffer(total)
            offset = 0
            for view in views:
                item[offset : offset + view.nbytes] = view
                offset += view.nbytes
        if not _call_on(other._loop, other._deliver, item):
            raise ConnectionClosed(f"the event loop of {self.peer} is closed")

    def _deliver(self, item: memoryview | FrameTooLarge) -> None:
        if not self._closed:
            self._frames.append(item)
            self._wake()

    def _on_peer_closed(self) -> None:
        self._peer_closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def recv(self) -> memoryview:
        """The next frame; frames sent before the peer closed are still delivered."""
        async with self._recv_lock:
            while True:
                if self._closed:
                    raise ConnectionClosed(f"the connection to {self.peer} is closed")
                if self._frames:
                    item = self._frames.popleft()
                    if isinstance(item, FrameTooLarge):
                        # the same outcome as on a socket, whose stream would be out of step
                        await self.close()
                        raise item
                    return item
                if self._peer_closed:
                    raise ConnectionClosed(f"{self.peer} closed the connection")
                self._waiter = self._loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None

    async def close(self) -> None:
        """Close this end; the other end's ``recv`` raises ``ConnectionClosed`` once drained."""
        self.shut()

    def shut(self) -> None:
        """``close`` for callers outside a coroutine: it never needs to wait."""
        if self._closed:
            return
        self._closed = True
        self._frames.clear()
        self._wake()
        if self._other is not None:
            _call_on(self._other._loop, self._other._on_peer_closed)


class InprocListener(ServingListener):
    """A name in the process-wide table, served on the loop that called ``listen``."""

    def __init__(self, name: str, handler: ConnectionHandler, *, max_frame_bytes: int) -> None:
        """Serve ``name`` on the running loop (registration is ``InprocTransport.listen``'s)."""
        super().__init__(f"{SCHEME}://{name}", handler, max_frame_bytes=max_frame_bytes)
        self.name = name
        self.loop = asyncio.get_running_loop()

    def accept(self, conn: InprocConnection) -> None:
        """Start the handler for a new connection's server end. Runs on the listener's loop."""
        if self._closed:
            conn.shut()
        else:
            self._spawn(conn)

    async def _stop_accepting(self) -> None:
        with _listeners_lock:
            if _listeners.get(self.name) is self:
                del _listeners[self.name]


class InprocTransport(Transport):
    """Frames between event loops of this process: ``inproc://name``."""

    scheme = SCHEME
    reachable_remotely = False

    def __init__(self, settings: InprocSettings = InprocSettings()) -> None:
        """Nothing to configure; ``settings`` is accepted for the registry's sake."""
        self.settings = settings

    def default_url(self, host: str, port: int) -> str:
        """A fresh name in this process (host and port mean nothing here)."""
        return f"{SCHEME}://djinn-{uuid.uuid4().hex[:8]}"

    async def listen(
        self, url: str, handler: ConnectionHandler, *, max_frame_bytes: int
    ) -> InprocListener:
        """Register ``url``'s name; raises ``OSError`` (EADDRINUSE) when it is taken."""
        check_max_frame_bytes(max_frame_bytes)
        name = _name_of(url)
        with _listeners_lock:
            existing = _listeners.get(name)
            # a listener whose loop has ended without closing it can never serve again
            if existing is not None and not existing.loop.is_closed():
                raise OSError(errno.EADDRINUSE, f"{url} is already bound in this process")
            listener = InprocListener(name, handler, max_frame_bytes=max_frame_bytes)
            _listeners[name] = listener
        return listener

    async def connect(self, url: str, *, max_frame_bytes: int) -> InprocConnection:
        """Connect to the listener of ``url``; raises ``ConnectionRefusedError`` if none."""
        check_max_frame_bytes(max_frame_bytes)
        name = _name_of(url)
        with _listeners_lock:
            listener = _listeners.get(name)
        if listener is None:
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"nothing listens at {url}")
        number = next(_connection_numbers)
        client = InprocConnection(
            asyncio.get_running_loop(), max_frame_bytes=max_frame_bytes, peer=url
        )
        server = InprocConnection(
            listener.loop,
            max_frame_bytes=listener.max_frame_bytes,
            peer=f"{SCHEME}-client-{number}",
        )
        InprocConnection.pair(client, server)
        if not _call_on(listener.loop, listener.accept, server):
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"the event loop of {url} is closed")
        return client


@hookimpl
def djinn_register_strategies(registry: StrategyRegistry) -> None:
    """Offer the ``inproc`` transport."""
    registry.add("transport", "inproc", InprocTransport, settings=InprocSettings)
