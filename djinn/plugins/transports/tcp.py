"""The ``tcp`` transport: length-prefixed frames over TCP sockets driven by asyncio.

Raw non-blocking sockets rather than asyncio streams: a frame is received with
``loop.sock_recv_into`` straight into a buffer allocated for it, and large parts are sent with
``loop.sock_sendall`` straight from the caller's buffers. (``StreamReader.readexactly`` copies
every byte through its own buffer and reached a tenth of the throughput.)
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs
from attrs import validators

from djinn.kernel.hookspecs import hookimpl
from djinn.wire.contracts import Buffer, Connection, ConnectionHandler, Transport
from djinn.plugins.transports._framing import (
    LENGTH_PREFIX,
    ServingListener,
    byte_views,
    check_frame_length,
    check_max_frame_bytes,
    join_url,
    new_frame_buffer,
    split_url,
)
from djinn.wire.errors import ConnectionClosed, FrameTooLarge

if TYPE_CHECKING:
    from djinn.kernel.plugins import StrategyRegistry

log = logging.getLogger("djinn.transports.tcp")

_non_negative_int = [validators.instance_of(int), validators.ge(0)]


@attrs.frozen
class TcpSettings:
    """Socket options of the ``tcp`` transport (``[settings.tcp]`` in plugins.toml)."""

    #: send small frames at once instead of waiting to fill a segment (Nagle's algorithm off)
    nodelay: bool = attrs.field(default=True, validator=validators.instance_of(bool))
    #: SO_SNDBUF / SO_RCVBUF; the kernel caps them at net.core.wmem_max / rmem_max, and 0
    #: leaves the kernel's automatic tuning in place
    send_buffer_bytes: int = attrs.field(default=4 << 20, validator=_non_negative_int)
    recv_buffer_bytes: int = attrs.field(default=4 << 20, validator=_non_negative_int)
    #: parts smaller than this are joined with the length prefix into one send call;
    #: larger ones are sent from the caller's buffer without a copy
    coalesce_bytes: int = attrs.field(default=64 << 10, validator=_non_negative_int)
    #: pending connections the kernel queues before the server accepts them
    backlog: int = attrs.field(
        default=128, validator=[validators.instance_of(int), validators.gt(0)]
    )


def _tune(sock: socket.socket, settings: TcpSettings) -> None:
    """Apply ``settings`` to a socket (before connect/listen, so the window scale fits)."""
    if settings.send_buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.send_buffer_bytes)
    if settings.recv_buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, settings.recv_buffer_bytes)
    if settings.nodelay and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class TcpConnection(Connection):
    """One TCP stream of frames. Senders and receivers are serialised by one lock each."""

    def __init__(self, sock: socket.socket, *, max_frame_bytes: int, coalesce_bytes: int) -> None:
        """Wrap a connected socket; it is made non-blocking and owned from now on."""
        sock.setblocking(False)
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self.max_frame_bytes = max_frame_bytes
        self._coalesce_bytes = coalesce_bytes
        self._send_lock = asyncio.Lock()
        self._recv_lock = asyncio.Lock()
        self._prefix = memoryview(bytearray(LENGTH_PREFIX.size))
        self._closed = False
        # socket calls in progress: closing the descriptor waits for them, since the event
        # loop still watches it for them
        self._in_flight = 0
        # bytes of the frame being received so far: a cancelled recv past 0 loses the stream
        self._received = 0
        try:
            host, port = sock.getpeername()[:2]
            self.peer = join_url("tcp", host, port)
        except OSError:
            self.peer = "tcp://?"

    async def send(self, parts: Sequence[Buffer]) -> None:
        """Send one frame: the length prefix, then ``parts`` back to back."""
        views, total = byte_views(parts)
        async with self._send_lock:
            self._enter()
            try:
                batch: list[Buffer] = [LENGTH_PREFIX.pack(total)]
                batch_bytes = LENGTH_PREFIX.size
                for view in views:
                    if view.nbytes < self._coalesce_bytes:
                        batch.append(view)
                        batch_bytes += view.nbytes
                        if batch_bytes < self._coalesce_bytes:
                            continue
                    elif view.nbytes:
                        await self._send_batch(batch)
                        batch = [view]
                    await self._send_batch(batch)
                    batch, batch_bytes = [], 0
                await self._send_batch(batch)
            except OSError as e:
                self._shut()
                raise ConnectionClosed(f"sending to {self.peer} failed: {e}") from e
            except BaseException:
                # cancelled part-way through a frame: the peer could never find the next one
                self._shut()
                raise
            finally:
                self._leave()

    async def _send_batch(self, batch: list[Buffer]) -> None:
        if len(batch) > 1:
            await self._loop.sock_sendall(self._sock, b"".join(batch))
        elif batch:
            await self._loop.sock_sendall(self._sock, batch[0])

    async def recv(self) -> memoryview:
        """Receive one whole frame into a new buffer of its own."""
        async with self._recv_lock:
            self._enter()
            self._received = 0
            try:
                await self._fill(self._prefix, "length prefix")
                (nbytes,) = LENGTH_PREFIX.unpack(self._prefix)
                check_frame_length(nbytes, self.max_frame_bytes)
                frame = new_frame_buffer(nbytes)
                await self._fill(frame, "payload")
                return frame
            except (ConnectionClosed, FrameTooLarge):
                # after an oversized announcement the stream is out of step: drop it
                self._shut()
                raise
            except OSError as e:
                self._shut()
                raise ConnectionClosed(f"receiving from {self.peer} failed: {e}") from e
            except BaseException:
                if self._received:
                    self._shut()
                raise
            finally:
                self._leave()

    async def _fill(self, view: memoryview, what: str) -> None:
        """Read until ``view`` is full; ``what`` names the part of the frame in errors."""
        filled = 0
        while filled < len(view):
            n = await self._loop.sock_recv_into(self._sock, view[filled:])
            if n == 0:
                if self._closed:
                    raise ConnectionClosed(f"the connection to {self.peer} is closed")
                if self._received:
                    raise ConnectionClosed(
                        f"{self.peer} disconnected mid-frame, after {filled} of the "
                        f"{len(view)} bytes of its {what}"
                    )
                raise ConnectionClosed(f"{self.peer} closed the connection")
            filled += n
            self._received += n

    async def close(self) -> None:
        """Close; pending and later ``send``/``recv`` calls raise ``ConnectionClosed``."""
        self._shut()

    def _enter(self) -> None:
        if self._closed:
            raise ConnectionClosed(f"the connection to {self.peer} is closed")
        self._in_flight += 1

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._closed and not self._in_flight:
            self._sock.close()

    def _shut(self) -> None:
        """Mark closed and shut the socket down; the descriptor closes once no call uses it."""
        if self._closed:
            return
        self._closed = True
        try:
            # wakes our own pending sock_recv_into (EOF) and sock_sendall (EPIPE)
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # never connected or already reset: nothing to shut down
        if not self._in_flight:
            self._sock.close()


class TcpListener(ServingListener):
    """A listening socket and its accept loop."""

    def __init__(
        self,
        sock: socket.socket,
        url: str,
        handler: ConnectionHandler,
        *,
        max_frame_bytes: int,
        settings: TcpSettings,
    ) -> None:
        """Start accepting on a bound, listening, non-blocking socket."""
        super().__init__(url, handler, max_frame_bytes=max_frame_bytes)
        self._sock = sock
        self._settings = settings
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self._sock)
            except OSError as e:
                # e.g. out of file descriptors: wait for some to close rather than spin
                log.warning("accepting on %s failed: %s", self.url, e)
                await asyncio.sleep(0.1)
                continue
            try:
                _tune(sock, self._settings)
                conn = TcpConnection(
                    sock,
                    max_frame_bytes=self.max_frame_bytes,
                    coalesce_bytes=self._settings.coalesce_bytes,
                )
            except OSError as e:
                log.warning("setting up a connection on %s failed: %s", self.url, e)
                sock.close()
                continue
            self._spawn(conn)

    async def _stop_accepting(self) -> None:
        self._accept_task.cancel()
        await asyncio.gather(self._accept_task, return_exceptions=True)
        self._sock.close()


class TcpTransport(Transport):
    """Frames over TCP: ``tcp://host:port`` (port 0 lets the kernel pick one)."""

    scheme = "tcp"

    def __init__(self, settings: TcpSettings = TcpSettings()) -> None:
        """Keep the socket settings every listener and connection of this transport uses."""
        self.settings = settings

    async def listen(
        self, url: str, handler: ConnectionHandler, *, max_frame_bytes: int
    ) -> TcpListener:
        """Bind ``url`` and serve every accepted connection with ``handler`` in a task."""
        check_max_frame_bytes(max_frame_bytes)
        host, port = split_url(url, self.scheme)
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, type_, proto, _, address = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _tune(sock, self.settings)
            sock.bind(address)
            sock.listen(self.settings.backlog)
            sock.setblocking(False)
            bound_port = sock.getsockname()[1]
        except BaseException:
            sock.close()
            raise
        return TcpListener(
            sock,
            join_url(self.scheme, host, bound_port),
            handler,
            max_frame_bytes=max_frame_bytes,
            settings=self.settings,
        )

    async def connect(self, url: str, *, max_frame_bytes: int) -> TcpConnection:
        """Connect to ``url``; raises ``OSError`` (e.g. ``ConnectionRefusedError``) on failure."""
        check_max_frame_bytes(max_frame_bytes)
        host, port = split_url(url, self.scheme)
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        error: OSError | None = None
        for family, type_, proto, _, address in infos:
            sock = socket.socket(family, type_, proto)
            try:
                _tune(sock, self.settings)
                sock.setblocking(False)
                await loop.sock_connect(sock, address)
            except OSError as e:
                sock.close()
                error = e
                continue
            except BaseException:
                sock.close()
                raise
            return TcpConnection(
                sock, max_frame_bytes=max_frame_bytes, coalesce_bytes=self.settings.coalesce_bytes
            )
        assert error is not None  # getaddrinfo returns at least one address or raises
        raise error


@hookimpl
def djinn_register_strategies(registry: StrategyRegistry) -> None:
    """Offer the ``tcp`` transport."""
    registry.add("transport", "tcp", TcpTransport, settings=TcpSettings)
