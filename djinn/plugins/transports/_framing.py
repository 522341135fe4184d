"""What the built-in transports share: the length prefix, frame buffers, URLs, listeners.

Every transport moves the same frames: an 8-byte little-endian length, then that many bytes.
A received frame lands in a buffer of its own, allocated uninitialised for that frame.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
import weakref
from abc import abstractmethod
from collections import deque
from collections.abc import Sequence
from urllib.parse import urlsplit

import numpy as np

from djinn.wire.contracts import Buffer, Connection, ConnectionHandler, Listener
from djinn.wire.errors import ConnectionClosed, FrameTooLarge

log = logging.getLogger("djinn.transports")

#: the length prefix of every frame: unsigned 64-bit, little-endian
LENGTH_PREFIX = struct.Struct("<Q")


def byte_views(parts: Sequence[Buffer]) -> tuple[list[memoryview], int]:
    """Flat unsigned-byte views of ``parts`` (no copies) and their total size in bytes.

    Raises ``ValueError`` for a part that is not C-contiguous: it has no single byte range.
    """
    views = []
    total = 0
    for part in parts:
        view = memoryview(part)
        if view.format != "B" or view.ndim != 1:
            if not view.c_contiguous:
                raise ValueError("a frame part must be a C-contiguous buffer")
            view = view.cast("B")
        views.append(view)
        total += view.nbytes
    return views, total


class FrameBuffers:
    """Receive buffers: new ones for small frames, recycled ones for large frames.

    Fresh memory costs a page fault per page when first written: 0.1 to 0.45 ms per MB on a
    test VM, about what loopback TCP takes to deliver a MB. So a large frame is a numpy view
    of a base array, and when that view is garbage (the frame's memoryview and everything
    made from it: numpy arrays, torch tensors, Arrow buffers all hold a reference) a finalizer
    returns the base here for a later frame of similar size. Memory is never reused while
    reachable.
    """

    def __init__(self, *, min_bytes: int = 1 << 20, max_idle_bytes: int = 256 << 20) -> None:
        """Recycle frames of ``min_bytes`` or more; keep at most ``max_idle_bytes`` idle."""
        self.min_bytes = min_bytes
        self.max_idle_bytes = max_idle_bytes
        self._lock = threading.Lock()
        self._idle: list[np.ndarray] = []  # oldest first
        self._idle_bytes = 0
        # finalizers run on whatever thread drops a frame, possibly inside take() itself (a
        # garbage collection there): they only append here, which needs no lock
        self._returned: deque[np.ndarray] = deque()

    def take(self, nbytes: int) -> memoryview:
        """A writable, uninitialised buffer of ``nbytes`` owned by the returned memoryview.

        numpy rather than ``bytearray`` (which zero-fills) or torch: numpy also asks the kernel
        for huge pages for large arrays, which makes first-touch page faults ~3x cheaper.
        """
        if nbytes < self.min_bytes:
            return memoryview(np.empty(nbytes, dtype=np.uint8))
        base = self._reuse(nbytes)
        if base is None:
            base = np.empty(nbytes, dtype=np.uint8)
        frame = base[:nbytes]
        weakref.finalize(frame, self._returned.append, base).atexit = False
        return memoryview(frame)

    def idle_bytes(self) -> int:
        """Bytes held by idle buffers, including those returned since the last ``take``."""
        with self._lock:
            return self._idle_bytes + sum(base.nbytes for base in self._returned)

    def _reuse(self, nbytes: int) -> np.ndarray | None:
        with self._lock:
            while self._returned:
                base = self._returned.popleft()
                self._idle.append(base)
                self._idle_bytes += base.nbytes
            while self._idle_bytes > self.max_idle_bytes:
                self._idle_bytes -= self._idle.pop(0).nbytes
            # the smallest that fits, and never one more than twice the frame's size
            fits = [i for i, base in enumerate(self._idle) if nbytes <= base.nbytes <= 2 * nbytes]
            if not fits:
                return None
            chosen = min(fits, key=lambda i: self._idle[i].nbytes)
            base = self._idle.pop(chosen)
            self._idle_bytes -= base.nbytes
            return base


#: one recycler for the process, so idle memory is bounded once, not per connection
FRAME_BUFFERS = FrameBuffers()


def new_frame_buffer(nbytes: int) -> memoryview:
    """A buffer for one received frame of ``nbytes``: see ``FrameBuffers.take``."""
    return FRAME_BUFFERS.take(nbytes)


def check_frame_length(nbytes: int, max_frame_bytes: int) -> None:
    """Raise ``FrameTooLarge`` when an announced frame exceeds the connection's limit."""
    if nbytes > max_frame_bytes:
        raise FrameTooLarge(
            f"the peer announced a frame of {nbytes} bytes; the limit is {max_frame_bytes} "
            "(raise max_frame_bytes on this side if such frames are expected)"
        )


def check_max_frame_bytes(max_frame_bytes: int) -> int:
    """Validate a ``max_frame_bytes`` argument (a positive int) and return it."""
    if isinstance(max_frame_bytes, bool) or not isinstance(max_frame_bytes, int):
        raise TypeError(f"max_frame_bytes must be an int, not {type(max_frame_bytes).__name__}")
    if max_frame_bytes <= 0:
        raise ValueError(f"max_frame_bytes must be positive, not {max_frame_bytes}")
    return max_frame_bytes


def split_url(url: str, scheme: str) -> tuple[str, int]:
    """``scheme://host:port`` -> ``(host, port)``; raise ``ValueError`` for anything else.

    IPv6 hosts are written in brackets (``tcp://[::1]:7000``) and returned without them.
    """
    parts = urlsplit(url)
    if parts.scheme != scheme:
        raise ValueError(f"{url!r} is not a {scheme}:// URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{url!r}: expected {scheme}://host:port and nothing after it")
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{url!r}: {e}") from None
    if port is None or parts.hostname is None:
        raise ValueError(f"{url!r}: expected {scheme}://host:port (port 0 picks a free one)")
    return parts.hostname, port


def join_url(scheme: str, host: str, port: int) -> str:
    """The inverse of ``split_url``: brackets around an IPv6 host."""
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


class ServingListener(Listener):
    """What every transport's listener shares: a handler task per accepted connection, each
    logged when it fails, all cancelled when the listener closes. Used on one event loop."""

    def __init__(self, url: str, handler: ConnectionHandler, *, max_frame_bytes: int) -> None:
        """Serve connections accepted on ``url`` with ``handler``."""
        self.url = url
        self.max_frame_bytes = max_frame_bytes
        self._handler = handler
        self._handler_tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def _spawn(self, conn: Connection) -> None:
        """Run the handler for a newly accepted connection as a task of its own."""
        task = asyncio.get_running_loop().create_task(self._run_handler(conn))
        self._handler_tasks.add(task)
        task.add_done_callback(self._handler_tasks.discard)

    async def _run_handler(self, conn: Connection) -> None:
        try:
            await self._handler(conn)
        except ConnectionClosed:
            log.debug("connection from %s closed while its handler ran", conn.peer)
            await conn.close()
        except Exception:
            # one failing handler must not take the listener down: log it and drop its
            # connection, whose stream position is unknown now
            log.exception("the handler of the connection from %s raised", conn.peer)
            await conn.close()

    @abstractmethod
    async def _stop_accepting(self) -> None:
        """Release the address; no new connection arrives after this returns."""

    async def close(self) -> None:
        """Stop accepting and cancel running handlers; open connections stay usable."""
        if self._closed:
            return
        self._closed = True
        await self._stop_accepting()
        # a handler that closes its own listener must not wait for itself
        tasks = [t for t in self._handler_tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
