"""Conformance of every transport plugin to the ``Transport``/``Connection``/``Listener`` contract.

Runs over tcp, inproc and (when ``ucxx`` imports) ucx, or over the one transport named by the
environment variable ``DJINN_TRANSPORT`` (tox runs one environment per transport). Transports
are built straight from their plugin classes; no plugin manager is involved, except in
``TestContract``: the slot's suite from ``djinn.testing``, built by entry-point name as a
third party's transport would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from djinn.kernel.errors import PluginError
from djinn.wire.contracts import Connection, ConnectionHandler, Listener, Transport
from djinn.plugins.transports import inproc, tcp, ucx
from djinn.plugins.transports._framing import LENGTH_PREFIX, FrameBuffers
from djinn.testing import TransportContract, build_strategy
from djinn.wire.errors import ConnectionClosed, FrameTooLarge

LIMIT = 512 << 20  # max_frame_bytes unless a test says otherwise
WAIT_S = 20.0  # a hung transport fails its test instead of stalling the run


def _ucx_missing() -> str | None:
    try:
        ucx.import_ucxx()
    except PluginError as e:
        return str(e)
    return None


UCX_MISSING = _ucx_missing()


def _transport_params() -> list[Any]:
    names = ["tcp", "inproc", "ucx"]
    chosen = os.environ.get("DJINN_TRANSPORT")
    if chosen:
        if chosen not in names:
            raise ValueError(f"DJINN_TRANSPORT={chosen!r}; expected one of {names}")
        names = [chosen]
    skip_ucx = pytest.mark.skipif(UCX_MISSING is not None, reason=UCX_MISSING or "")
    return [pytest.param(n, marks=skip_ucx) if n == "ucx" else n for n in names]


def _build(name: str) -> Transport:
    if name == "tcp":
        return tcp.TcpTransport(tcp.TcpSettings())
    if name == "inproc":
        return inproc.InprocTransport(inproc.InprocSettings())
    return ucx.UcxTransport(ucx.UcxSettings())


def _listen_url(name: str) -> str:
    if name == "inproc":
        return f"inproc://conformance-{uuid.uuid4().hex}"
    return f"{name}://127.0.0.1:0"


@pytest.fixture(params=_transport_params())
def kind(request: pytest.FixtureRequest) -> str:
    """The name of the transport under test."""
    return request.param


def run(coro: Awaitable[Any]) -> Any:
    """Run one test body on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, WAIT_S))


def pattern(nbytes: int, seed: int = 0) -> np.ndarray:
    """Bytes whose every 4-byte word differs from its neighbours, so any shift shows."""
    words = np.arange(seed, seed + (nbytes + 3) // 4, dtype=np.uint32)
    return words.view(np.uint8)[:nbytes]


def same_bytes(frame: memoryview, expected: np.ndarray | bytes) -> bool:
    """Byte-exact comparison, fast for large frames."""
    got = np.frombuffer(frame, dtype=np.uint8)
    want = np.frombuffer(expected, dtype=np.uint8) if isinstance(expected, bytes) else expected
    return got.shape == want.shape and bool(np.array_equal(got, want))


async def echo(conn: Connection) -> None:
    """Send every frame back until the peer goes away."""
    while True:
        await conn.send([await conn.recv()])


class Recorder:
    """A handler that echoes, and records how each connection's ``recv`` ended."""

    def __init__(self) -> None:
        self.endings: asyncio.Queue[BaseException] = asyncio.Queue()

    async def __call__(self, conn: Connection) -> None:
        while True:
            try:
                frame = await conn.recv()
            except Exception as e:
                self.endings.put_nowait(e)
                return
            await conn.send([frame])

    async def next_ending(self) -> BaseException:
        """How the next connection ended."""
        return await asyncio.wait_for(self.endings.get(), WAIT_S)


@contextlib.asynccontextmanager
async def serving(
    kind: str, handler: ConnectionHandler, max_frame_bytes: int = LIMIT
) -> AsyncIterator[tuple[Transport, Listener]]:
    """A fresh transport of ``kind`` and a listener on it, closed on the way out."""
    transport = _build(kind)
    listener = await transport.listen(_listen_url(kind), handler, max_frame_bytes=max_frame_bytes)
    try:
        yield transport, listener
    finally:
        await listener.close()


@contextlib.asynccontextmanager
async def connected(transport: Transport, url: str) -> AsyncIterator[Connection]:
    """A client connection to ``url``, closed on the way out."""
    conn = await transport.connect(url, max_frame_bytes=LIMIT)
    try:
        yield conn
    finally:
        await conn.close()


async def round_trip(conn: Connection, parts: list[Any]) -> memoryview:
    """Send one frame and return the echo."""
    await conn.send(parts)
    return await conn.recv()


async def assert_echoes(transport: Transport, url: str) -> None:
    """A new client gets an echo: the listener still serves."""
    async with connected(transport, url) as conn:
        assert bytes(await round_trip(conn, [b"still serving"])) == b"still serving"


async def send_raw(kind: str, url: str, announced: int, payload: bytes) -> None:
    """Open a bare connection to ``url``, announce a frame of ``announced`` bytes, write only
    ``payload`` of it, and disconnect: what a crashed or hostile peer does."""
    host, port = url.split("://")[1].rsplit(":", 1)
    if kind == "tcp":
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(LENGTH_PREFIX.pack(announced) + payload)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    else:
        ucxx = ucx.import_ucxx()
        endpoint = await ucxx.create_endpoint(host, int(port))
        header = np.zeros(2 + ucx.MAX_SEGMENTS, dtype="<u8")
        header[:4] = [announced, 2, len(payload), announced - len(payload)]
        await endpoint.send(header)
        if payload:
            await endpoint.send(payload)
        await endpoint.close()


class TestContract(TransportContract):
    """The transport contract suite, over each transport under test."""

    @pytest.fixture(params=_transport_params())
    def transport(self, request: pytest.FixtureRequest) -> Transport:
        """The transport under test, built through a fresh plugin manager by its name."""
        return build_strategy(request.param, "transport")


# --------------------------------------------------------------------------- round trips


def test_echo_round_trip_of_small_multi_part_and_1mb_frames(kind: str) -> None:
    """Frames of 0 bytes, 1 byte, several parts of every buffer type and 1 MB come back exact."""

    async def body() -> None:
        async with serving(kind, echo) as (transport, listener), connected(
            transport, listener.url
        ) as conn:
            empty = await round_trip(conn, [])
            assert isinstance(empty, memoryview) and empty.nbytes == 0
            assert bytes(await round_trip(conn, [b""])) == b""
            assert bytes(await round_trip(conn, [b"x"])) == b"x"

            large_part = pattern(300_000, seed=7)  # above the coalescing threshold
            parts = [b"head", bytearray(b"-"), b"", memoryview(large_part), pattern(10).tobytes()]
            frame = await round_trip(conn, parts)
            expected = b"head-" + large_part.tobytes() + pattern(10).tobytes()
            assert same_bytes(frame, expected)

            # a 2-D buffer travels as its bytes
            grid = np.arange(12, dtype=np.int32).reshape(3, 4)
            assert same_bytes(await round_trip(conn, [memoryview(grid)]), grid.tobytes())

            megabyte = pattern(1 << 20, seed=3)
            frame = await round_trip(conn, [megabyte])
            assert same_bytes(frame, megabyte)
            # the frame is the receiver's own writable buffer
            assert not frame.readonly
            frame[0] = 255

    run(body())


def test_echo_round_trip_of_a_256mb_frame(kind: str) -> None:
    """One 256 MB frame arrives byte-exact both ways."""

    async def body() -> None:
        async with serving(kind, echo) as (transport, listener), connected(
            transport, listener.url
        ) as conn:
            payload = pattern(256 << 20, seed=11)
            frame = await round_trip(conn, [payload[:100], payload[100:]])
            assert same_bytes(frame, payload)

    run(body())


def test_sender_may_reuse_its_buffer_once_send_returns(kind: str) -> None:
    """What was sent is what arrives, even if the sender overwrites its buffer right after."""

    async def body() -> None:
        async with serving(kind, echo) as (transport, listener), connected(
            transport, listener.url
        ) as conn:
            buffer = bytearray(b"a" * 100_000)
            await conn.send([buffer])
            buffer[:] = b"b" * 100_000
            assert bytes(await conn.recv()) == b"a" * 100_000

    run(body())


# --------------------------------------------------------------------------- concurrency


def test_32_concurrent_clients_get_their_own_frames_back(kind: str) -> None:
    """32 clients interleave frames of different sizes; each gets exactly its own, in order."""

    async def client(transport: Transport, url: str, number: int) -> None:
        async with connected(transport, url) as conn:
            for sequence in range(6):
                nbytes = 1 + (number * 977 + sequence * 31_013) % 200_000
                payload = pattern(nbytes, seed=number * 1000 + sequence)
                await conn.send([bytes([number, sequence]), payload])
                frame = await conn.recv()
                assert bytes(frame[:2]) == bytes([number, sequence])
                assert same_bytes(frame[2:], payload)
                await asyncio.sleep(0)  # let the others interleave

    async def body() -> None:
        async with serving(kind, echo) as (transport, listener):
            await asyncio.gather(*(client(transport, listener.url, n) for n in range(32)))

    run(body())


def test_concurrent_senders_on_one_connection_never_interleave(kind: str) -> None:
    """Frames sent at once from many tasks on one connection each arrive whole."""
    senders, frames_each, part_bytes = 8, 6, 256 << 10

    async def body() -> None:
        async with serving(kind, echo) as (transport, listener), connected(
            transport, listener.url
        ) as conn:
            await check(conn)

    async def check(conn: Connection) -> None:
        async def sender(number: int) -> None:
            for sequence in range(frames_each):
                fill = np.full(part_bytes, number * frames_each + sequence, dtype=np.uint8)
                # several parts, large ones included, so a frame spans several send calls
                await conn.send([bytes([number, sequence]), fill, fill[:1000], fill])

        received: dict[int, list[int]] = {n: [] for n in range(senders)}
        sending = asyncio.gather(*(sender(n) for n in range(senders)))
        try:
            for _ in range(senders * frames_each):
                frame = await conn.recv()
                number, sequence = frame[0], frame[1]
                body_bytes = np.frombuffer(frame[2:], dtype=np.uint8)
                assert body_bytes.size == 2 * part_bytes + 1000
                assert (body_bytes == number * frames_each + sequence).all()
                received[number].append(sequence)
            await sending
            assert all(seqs == list(range(frames_each)) for seqs in received.values())
        finally:
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)

    run(body())


# --------------------------------------------------------------------------- failures


def test_peer_disconnecting_mid_frame_raises_connection_closed(kind: str) -> None:
    """A peer that announces a frame, writes half of it and disconnects ends the server's
    ``recv`` with ``ConnectionClosed``; the listener goes on serving new clients."""
    if kind == "inproc":
        pytest.skip("inproc hands over whole frames: there is no half-written one")

    async def body() -> None:
        recorder = Recorder()
        async with serving(kind, recorder) as (transport, listener):
            await send_raw(kind, listener.url, announced=1000, payload=b"x" * 500)
            ending = await recorder.next_ending()
            assert isinstance(ending, ConnectionClosed), repr(ending)
            await assert_echoes(transport, listener.url)

    run(body())


def test_frame_over_the_limit_raises_frame_too_large(kind: str) -> None:
    """A frame announcing more than the receiver's limit: ``FrameTooLarge`` there, the
    connection is dropped (the sender's ``recv`` ends), and a new client is served."""

    async def body() -> None:
        recorder = Recorder()
        async with serving(kind, recorder, max_frame_bytes=1024) as (transport, listener):
            async with connected(transport, listener.url) as conn:
                assert bytes(await round_trip(conn, [b"a" * 1024])) == b"a" * 1024
                await conn.send([b"a" * 1000, b"b" * 25])
                ending = await recorder.next_ending()
                assert isinstance(ending, FrameTooLarge), repr(ending)
                with pytest.raises(ConnectionClosed):
                    await conn.recv()
            await assert_echoes(transport, listener.url)

    run(body())


def test_absurd_announced_length_is_refused_before_allocating(kind: str) -> None:
    """An announced length of 2**62 bytes is refused as ``FrameTooLarge``, not a ``MemoryError``."""
    if kind == "inproc":
        pytest.skip("inproc frames are checked before they are copied; nothing is announced")

    async def body() -> None:
        recorder = Recorder()
        async with serving(kind, recorder) as (transport, listener):
            await send_raw(kind, listener.url, announced=1 << 62, payload=b"")
            ending = await recorder.next_ending()
            assert isinstance(ending, FrameTooLarge), repr(ending)
            await assert_echoes(transport, listener.url)

    run(body())


def test_closing_one_end_ends_the_other_ends_recv(kind: str) -> None:
    """Either end's close makes the other's ``recv`` raise ``ConnectionClosed``; its own pending
    and later calls raise ``ConnectionClosed`` too."""

    async def body() -> None:
        transport = _build(kind)
        recorder = Recorder()
        server_ends: asyncio.Queue[Connection] = asyncio.Queue()

        async def keep(conn: Connection) -> None:
            server_ends.put_nowait(conn)

        listener = await transport.listen(_listen_url(kind), recorder, max_frame_bytes=LIMIT)
        keeper = await transport.listen(_listen_url(kind), keep, max_frame_bytes=LIMIT)
        try:
            # the client closes: the server's recv ends
            conn = await transport.connect(listener.url, max_frame_bytes=LIMIT)
            assert bytes(await round_trip(conn, [b"ping"])) == b"ping"
            await conn.close()
            assert isinstance(await recorder.next_ending(), ConnectionClosed)
            with pytest.raises(ConnectionClosed):
                await conn.recv()
            with pytest.raises(ConnectionClosed):
                await conn.send([b"after close"])
            await conn.close()  # closing twice is harmless

            # the server closes: the client's pending recv ends
            conn = await transport.connect(keeper.url, max_frame_bytes=LIMIT)
            server_end = await asyncio.wait_for(server_ends.get(), WAIT_S)
            pending = asyncio.ensure_future(conn.recv())
            await asyncio.sleep(0.05)
            await server_end.close()
            with pytest.raises(ConnectionClosed):
                await pending
            await conn.close()

            # a local close ends this end's own pending recv
            conn = await transport.connect(keeper.url, max_frame_bytes=LIMIT)
            server_end = await asyncio.wait_for(server_ends.get(), WAIT_S)
            pending = asyncio.ensure_future(conn.recv())
            await asyncio.sleep(0.05)
            await conn.close()
            with pytest.raises(ConnectionClosed):
                await pending
            with pytest.raises(ConnectionClosed):
                await server_end.recv()
            await server_end.close()
        finally:
            await listener.close()
            await keeper.close()

    run(body())


def test_a_failing_handler_does_not_stop_the_listener(kind: str) -> None:
    """A handler that raises loses only its own connection; later clients are served."""

    async def body() -> None:
        calls = 0

        async def handler(conn: Connection) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                await conn.recv()
                raise RuntimeError("a bug in the first handler")
            await echo(conn)

        async with serving(kind, handler) as (transport, listener):
            async with connected(transport, listener.url) as conn:
                await conn.send([b"boom"])
                with pytest.raises(ConnectionClosed):
                    await conn.recv()
            await assert_echoes(transport, listener.url)

    run(body())


def test_listener_close_keeps_open_connections_usable(kind: str) -> None:
    """After the listener closes, a connection it accepted still carries frames both ways."""

    async def body() -> None:
        transport = _build(kind)
        server_ends: asyncio.Queue[Connection] = asyncio.Queue()

        async def keep(conn: Connection) -> None:
            server_ends.put_nowait(conn)

        listener = await transport.listen(_listen_url(kind), keep, max_frame_bytes=LIMIT)
        conn = await transport.connect(listener.url, max_frame_bytes=LIMIT)
        server_end = await asyncio.wait_for(server_ends.get(), WAIT_S)
        await listener.close()
        await listener.close()  # closing twice is harmless
        try:
            await conn.send([b"to server"])
            assert bytes(await server_end.recv()) == b"to server"
            await server_end.send([b"to client"])
            assert bytes(await conn.recv()) == b"to client"
            if kind != "ucx":  # a ucx connect to nothing waits out its timeout first
                with pytest.raises(ConnectionRefusedError):
                    await transport.connect(listener.url, max_frame_bytes=LIMIT)
        finally:
            await conn.close()
            await server_end.close()

    run(body())


def test_a_cancelled_recv_never_loses_a_frame(kind: str) -> None:
    """A ``recv`` cancelled while waiting (a timeout) leaves tcp and inproc connections
    intact; ucx, whose posted receive outlives its waiter, closes the connection instead."""

    async def body() -> None:
        async with serving(kind, echo) as (transport, listener), connected(
            transport, listener.url
        ) as conn:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(conn.recv(), 0.05)
            if kind == "ucx":
                with pytest.raises(ConnectionClosed):
                    await round_trip(conn, [b"after a timeout"])
            else:
                assert bytes(await round_trip(conn, [b"after a timeout"])) == b"after a timeout"

    run(body())


def test_urls(kind: str) -> None:
    """A listener reports a usable URL (with the real port); malformed URLs are refused."""

    async def body() -> None:
        async with serving(kind, echo) as (transport, listener):
            assert listener.url.startswith(f"{kind}://")
            if kind != "inproc":
                assert int(listener.url.rsplit(":", 1)[1]) > 0
            with pytest.raises(ValueError):
                await transport.listen("nonsense://x", echo, max_frame_bytes=LIMIT)
            with pytest.raises(ValueError):
                await transport.connect(f"{kind}://", max_frame_bytes=LIMIT)
            with pytest.raises(ValueError):
                await transport.connect(listener.url, max_frame_bytes=0)

    run(body())


# --------------------------------------------------------------------------- frame buffers


def _address(frame: memoryview) -> int:
    return np.frombuffer(frame, dtype=np.uint8).ctypes.data


def test_large_frame_buffers_are_recycled_only_once_unreachable() -> None:
    """A large frame's memory is reused after the frame and every view of it are gone, never
    while anything still refers to it; small frames and much smaller frames get new memory."""
    buffers = FrameBuffers(min_bytes=1 << 20, max_idle_bytes=8 << 20)
    first = buffers.take(2 << 20)
    address = _address(first)
    derived = np.frombuffer(first[100:], dtype=np.uint8)  # keeps the memory reachable
    del first
    other = buffers.take(2 << 20)
    assert _address(other) != address

    del derived  # now nothing refers to it
    gc.collect()
    again = buffers.take(2 << 20)
    assert _address(again) == address and again.nbytes == 2 << 20 and not again.readonly

    addresses = {_address(again), _address(other)}
    del again, other
    gc.collect()
    assert _address(buffers.take(512 << 10)) != address  # small: plain new memory
    assert _address(buffers.take(1536 << 10)) in addresses  # fits, and not under half

    held = [buffers.take(3 << 20) for _ in range(4)]
    del held
    gc.collect()
    assert buffers.idle_bytes() > 8 << 20  # all returned; trimmed on the next take
    buffers.take(1 << 20)
    assert buffers.idle_bytes() <= 8 << 20


# --------------------------------------------------------------------------- transport-specific


def test_inproc_listener_and_client_on_different_threads() -> None:
    """A listener on a loop in a background thread serves a client on another thread's loop."""
    transport = inproc.InprocTransport()
    url = f"inproc://threaded-{uuid.uuid4().hex}"
    server_loop = asyncio.new_event_loop()
    thread = threading.Thread(target=server_loop.run_forever, daemon=True)
    thread.start()
    recorder_holder: list[Recorder] = []

    async def start() -> Listener:
        recorder_holder.append(Recorder())
        return await transport.listen(url, recorder_holder[0], max_frame_bytes=LIMIT)

    listener = asyncio.run_coroutine_threadsafe(start(), server_loop).result(WAIT_S)
    try:

        async def client() -> None:
            conn = await transport.connect(url, max_frame_bytes=LIMIT)
            for size in (0, 1, 70_000, 3 << 20):
                payload = pattern(size, seed=size)
                assert same_bytes(await round_trip(conn, [payload]), payload)
            await conn.close()

        run(client())
        ending = asyncio.run_coroutine_threadsafe(
            recorder_holder[0].next_ending(), server_loop
        ).result(WAIT_S)
        assert isinstance(ending, ConnectionClosed)
    finally:
        asyncio.run_coroutine_threadsafe(listener.close(), server_loop).result(WAIT_S)
        server_loop.call_soon_threadsafe(server_loop.stop)
        thread.join(WAIT_S)
        server_loop.close()


def test_inproc_names_are_exclusive_and_must_exist() -> None:
    """A bound name cannot be bound again until closed; connecting to no listener is refused."""

    async def body() -> None:
        transport = inproc.InprocTransport()
        url = f"inproc://exclusive-{uuid.uuid4().hex}"
        listener = await transport.listen(url, echo, max_frame_bytes=LIMIT)
        with pytest.raises(OSError) as raised:
            await transport.listen(url, echo, max_frame_bytes=LIMIT)
        assert raised.value.errno == errno.EADDRINUSE
        await listener.close()
        with pytest.raises(ConnectionRefusedError):
            await transport.connect(url, max_frame_bytes=LIMIT)
        listener = await transport.listen(url, echo, max_frame_bytes=LIMIT)  # free again
        await listener.close()

    run(body())


def test_tcp_refuses_a_port_nobody_listens_on() -> None:
    """Connecting where nothing listens raises ``ConnectionRefusedError``."""

    async def body() -> None:
        transport = tcp.TcpTransport()
        listener = await transport.listen("tcp://127.0.0.1:0", echo, max_frame_bytes=LIMIT)
        url = listener.url
        await listener.close()
        with pytest.raises(ConnectionRefusedError):
            await transport.connect(url, max_frame_bytes=LIMIT)

    run(body())


def test_ucx_without_the_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``ucxx``, building the ucx transport fails with the extra to install."""
    monkeypatch.setitem(sys.modules, "ucxx", None)  # makes ``import ucxx`` fail
    with pytest.raises(PluginError, match=r"pip install 'djinn\[ucx\]'"):
        ucx.UcxTransport(ucx.UcxSettings())


def test_settings_are_validated() -> None:
    """Bad settings fail when built, not when a socket is opened."""
    with pytest.raises(TypeError):
        tcp.TcpSettings(nodelay="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        tcp.TcpSettings(send_buffer_bytes=-1)
    with pytest.raises(ValueError):
        tcp.TcpSettings(backlog=0)
    with pytest.raises(ValueError):
        ucx.UcxSettings(connect_timeout_s=0)
    with pytest.raises(TypeError):
        inproc.InprocSettings(anything=1)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("module", "name", "factory", "settings"),
    [
        (tcp, "tcp", tcp.TcpTransport, tcp.TcpSettings),
        (inproc, "inproc", inproc.InprocTransport, inproc.InprocSettings),
        (ucx, "ucx", ucx.UcxTransport, ucx.UcxSettings),
    ],
)
def test_each_plugin_registers_its_transport(
    module: Any, name: str, factory: Callable[..., Transport], settings: type
) -> None:
    """The registration hook offers the transport under its scheme, with its settings class."""
    added: list[tuple[Any, ...]] = []

    class Registry:
        def add(self, slot: str, entry: str, made_by: Any, *, settings: type) -> None:
            added.append((slot, entry, made_by, settings))

    module.djinn_register_strategies(Registry())
    assert added == [("transport", name, factory, settings)]
    assert factory.scheme == name
