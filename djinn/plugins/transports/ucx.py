"""The ``ucx`` transport: frames over UCX (RDMA, shared memory or TCP, whichever UCX picks).

Needs the optional extra ``djinn[ucx]`` (the ``ucxx`` package), imported only when this
transport is built, so a missing extra fails there with a message naming it.

UCX moves tagged messages, not a byte stream, and a message must land in one receive buffer.
A frame is therefore a fixed-size header message (``u64`` total length, ``u64`` segment count,
up to ``MAX_SEGMENTS`` ``u64`` segment lengths), then one message per segment, each received
straight into its slice of the frame's buffer. Large parts travel as segments of their own
without a copy; runs of small parts are joined into one segment.
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import logging
import os
import socket
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import attrs
import numpy as np
from attrs import validators

from djinn.kernel.errors import PluginError
from djinn.kernel.hookspecs import hookimpl
from djinn.wire.contracts import Buffer, Connection, ConnectionHandler, Transport
from djinn.plugins.transports._framing import (
    ServingListener,
    byte_views,
    check_frame_length,
    check_max_frame_bytes,
    join_url,
    new_frame_buffer,
    split_url,
)
from djinn.wire.errors import ConnectionClosed, FrameError

if TYPE_CHECKING:
    from djinn.kernel.plugins import StrategyRegistry

log = logging.getLogger("djinn.transports.ucx")

SCHEME = "ucx"
MISSING_EXTRA = "the ucx transport needs the optional extra: pip install 'djinn[ucx]'"

#: segments one frame may have; more parts than this are joined
MAX_SEGMENTS = 14
_HEADER_WORDS = 2 + MAX_SEGMENTS  # total, count, lengths


@attrs.frozen
class UcxSettings:
    """Options of the ``ucx`` transport (``[settings.ucx]`` in plugins.toml)."""

    #: let UCX report a failed peer as an error instead of aborting the process
    endpoint_error_handling: bool = attrs.field(
        default=True, validator=validators.instance_of(bool)
    )
    #: seconds a new connection may take to exchange endpoint information
    connect_timeout_s: float = attrs.field(
        default=5.0, validator=[validators.instance_of((int, float)), validators.gt(0)]
    )
    #: how UCX is driven: "blocking" wakes the event loop on UCX's own file descriptor;
    #: "thread" (ucxx's default) hands completions over from a thread, which measured ~2 ms
    #: per round trip against ~0.1 ms; "polling" keeps a core busy. Set once per process:
    #: the first ucx transport built decides.
    progress_mode: str = attrs.field(
        default="blocking",
        validator=validators.in_(("blocking", "polling", "thread", "thread-polling")),
    )
    #: parts smaller than this are joined into one segment; larger ones travel uncopied
    coalesce_bytes: int = attrs.field(
        default=64 << 10, validator=[validators.instance_of(int), validators.ge(0)]
    )


def import_ucxx() -> ModuleType:
    """Import ``ucxx`` or raise ``PluginError`` naming the extra to install."""
    # ucxx sets UCX_MEMTYPE_CACHE, which recent UCX builds no longer read and warn about
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    try:
        return importlib.import_module("ucxx")
    except Exception as e:  # ImportError, or a shared library that fails to load
        raise PluginError(f"{MISSING_EXTRA} ({type(e).__name__}: {e})") from e


def _segments(views: list[memoryview], coalesce_bytes: int) -> list[Buffer]:
    """Group ``views`` into at most ``MAX_SEGMENTS`` non-empty buffers, in order."""
    segments: list[Buffer] = []
    run: list[memoryview] = []

    def end_run() -> None:
        if run:
            segments.append(run[0] if len(run) == 1 else b"".join(run))
            run.clear()

    for view in views:
        if not view.nbytes:
            continue
        if view.nbytes < coalesce_bytes:
            run.append(view)
        else:
            end_run()
            segments.append(view)
    end_run()
    if len(segments) > MAX_SEGMENTS:
        segments[MAX_SEGMENTS - 1 :] = [b"".join(segments[MAX_SEGMENTS - 1 :])]
    return segments


class UcxConnection(Connection):
    """One UCX endpoint carrying frames. Senders and receivers are serialised by one lock each.

    Cancelling a ``recv`` or ``send`` closes the connection: UCX keeps a posted request
    alive after its waiter is cancelled, and it would swallow the next message.
    """

    def __init__(
        self,
        endpoint,
        ucxx: ModuleType,
        *,
        max_frame_bytes: int,
        coalesce_bytes: int,
        peer: str,
    ) -> None:
        """Wrap a connected ``ucxx`` endpoint."""
        self.peer = peer
        self._endpoint = endpoint
        self._ucx_error = ucxx.exceptions.UCXError
        self.max_frame_bytes = max_frame_bytes
        self._coalesce_bytes = coalesce_bytes
        self._send_lock = asyncio.Lock()
        self._recv_lock = asyncio.Lock()
        self._header = np.empty(_HEADER_WORDS, dtype="<u8")
        self._closed = False
        self._closed_here = False  # by close(), not because the peer went away

    async def send(self, parts: Sequence[Buffer]) -> None:
        """Send one frame: its header message, then one message per segment."""
        views, total = byte_views(parts)
        segments = _segments(views, self._coalesce_bytes)
        header = np.zeros(_HEADER_WORDS, dtype="<u8")
        header[0], header[1] = total, len(segments)
        header[2 : 2 + len(segments)] = [memoryview(s).nbytes for s in segments]
        async with self._send_lock:
            self._check_open()
            try:
                await self._endpoint.send(header)
                for segment in segments:
                    self._check_open()  # closed by another task between two messages
                    await self._endpoint.send(segment)
            except self._ucx_error as e:
                await self._shut()
                raise ConnectionClosed(f"sending to {self.peer} failed: {e}") from e
            except BaseException:
                # cancelled part-way through a frame: the peer could never find the next one
                await self._shut()
                raise

    async def recv(self) -> memoryview:
        """Receive one whole frame into a new buffer of its own."""
        async with self._recv_lock:
            self._check_open()
            started = False  # True once the header is in: a failure after that is mid-frame
            try:
                await self._endpoint.recv(self._header)
                started = True
                total, count = int(self._header[0]), int(self._header[1])
                check_frame_length(total, self.max_frame_bytes)
                lengths = self._header[2 : 2 + count].tolist() if count <= MAX_SEGMENTS else None
                if lengths is None or sum(lengths) != total:
                    raise FrameError(f"{self.peer} sent a malformed frame header")
                frame = new_frame_buffer(total)
                offset = 0
                for length in lengths:
                    self._check_open()
                    await self._endpoint.recv(frame[offset : offset + length])
                    offset += length
                return frame
            except FrameError:
                # the segments announced are still coming: the stream is out of step
                await self._shut()
                raise
            except self._ucx_error as e:
                await self._shut()
                if self._closed_here:
                    raise ConnectionClosed(f"the connection to {self.peer} is closed") from e
                if started:
                    raise ConnectionClosed(f"{self.peer} disconnected mid-frame ({e})") from e
                raise ConnectionClosed(f"{self.peer} closed the connection ({e})") from e
            except BaseException:
                await self._shut()
                raise

    async def close(self) -> None:
        """Close; pending and later ``send``/``recv`` calls raise ``ConnectionClosed``."""
        self._closed_here = True
        await self._shut()

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionClosed(f"the connection to {self.peer} is closed")

    async def _shut(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # cancels our pending requests and tells the peer, whose requests fail in turn
            await self._endpoint.close()
        except self._ucx_error as e:
            log.debug("closing the ucx endpoint to %s: %s", self.peer, e)


class UcxListener(ServingListener):
    """A ``ucxx`` listener. UCX listens on every interface; the URL's host only names it."""

    def __init__(
        self,
        ucxx: ModuleType,
        host: str,
        port: int,
        handler: ConnectionHandler,
        *,
        max_frame_bytes: int,
        settings: UcxSettings,
    ) -> None:
        """Start listening on ``port`` (0 picks one) from the running loop."""
        super().__init__(join_url(SCHEME, host, port), handler, max_frame_bytes=max_frame_bytes)
        self._ucxx = ucxx
        self._settings = settings
        self._accepted = 0
        self._listener = ucxx.create_listener(
            self._on_endpoint,
            port=port,
            endpoint_error_handling=settings.endpoint_error_handling,
            connect_timeout=settings.connect_timeout_s,
        )
        self.url = join_url(SCHEME, host, self._listener.port)

    async def _on_endpoint(self, endpoint) -> None:
        # ucxx awaits this callback and warns about callbacks still running when its listener
        # goes away, so the handler runs in a task of ours, cancelled by close()
        if self._closed:
            await endpoint.close()
            return
        self._accepted += 1
        conn = UcxConnection(
            endpoint,
            self._ucxx,
            max_frame_bytes=self.max_frame_bytes,
            coalesce_bytes=self._settings.coalesce_bytes,
            peer=f"{SCHEME}-client-{self._accepted}",
        )
        self._spawn(conn)

    async def _stop_accepting(self) -> None:
        self._listener.close()


class UcxTransport(Transport):
    """Frames over UCX: ``ucx://host:port`` (port 0 lets UCX pick one)."""

    scheme = SCHEME

    def __init__(self, settings: UcxSettings = UcxSettings()) -> None:
        """Import ``ucxx``; raises ``PluginError`` naming the extra when it is not installed."""
        self.settings = settings
        self._ucxx = import_ucxx()
        try:
            self._ucxx.init(progress_mode=settings.progress_mode)
        except RuntimeError:
            # UCX is initialised once per process; an earlier transport (or the application)
            # has done it, and its progress mode stays
            log.debug("ucx was initialised before: progress_mode %r unused", settings.progress_mode)

    async def listen(
        self, url: str, handler: ConnectionHandler, *, max_frame_bytes: int
    ) -> UcxListener:
        """Listen on ``url``'s port and serve every new endpoint with ``handler`` in a task."""
        check_max_frame_bytes(max_frame_bytes)
        host, port = split_url(url, self.scheme)
        return UcxListener(
            self._ucxx, host, port, handler, max_frame_bytes=max_frame_bytes, settings=self.settings
        )

    async def connect(self, url: str, *, max_frame_bytes: int) -> UcxConnection:
        """Connect to ``url``; raises ``ConnectionRefusedError`` when no listener answers."""
        check_max_frame_bytes(max_frame_bytes)
        host, port = split_url(url, self.scheme)
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        address = infos[0][4][0]  # UCX takes a numeric address
        try:
            endpoint = await self._ucxx.create_endpoint(
                address,
                port,
                endpoint_error_handling=self.settings.endpoint_error_handling,
                connect_timeout=self.settings.connect_timeout_s,
            )
        except (TimeoutError, self._ucxx.exceptions.UCXError) as e:
            raise ConnectionRefusedError(
                errno.ECONNREFUSED, f"no ucx listener answered at {url}: {e}"
            ) from e
        return UcxConnection(
            endpoint,
            self._ucxx,
            max_frame_bytes=max_frame_bytes,
            coalesce_bytes=self.settings.coalesce_bytes,
            peer=url,
        )


@hookimpl
def djinn_register_strategies(registry: StrategyRegistry) -> None:
    """Offer the ``ucx`` transport."""
    registry.add("transport", "ucx", UcxTransport, settings=UcxSettings)
