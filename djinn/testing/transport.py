"""``TransportContract``: what every ``Transport`` promises, as tests a plugin's package reuses.

    from djinn.testing import TransportContract

    class TestMyTransport(TransportContract):
        plugin = "my_transport"

Each test runs on a fresh event loop against a listener at the transport's own
``default_url("127.0.0.1", 0)``; every wait is bounded so a hung transport fails instead of
stalling the run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any, ClassVar

import pytest

from djinn.wire.contracts import Connection, ConnectionHandler, Listener, Transport
from djinn.testing._plugins import build_strategy
from djinn.wire.errors import ConnectionClosed, FrameTooLarge

LIMIT = 8 << 20  # max_frame_bytes unless a test says otherwise
WAIT_S = 20.0  # bounds a hang; never reached by a working transport


def run(body: Awaitable[Any]) -> Any:
    """Run one test body on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(body, WAIT_S))


async def echo(conn: Connection) -> None:
    """Send every frame back until the peer goes away."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            await conn.send([await conn.recv()])


class Ends:
    """A handler that keeps each accepted connection for the test to drive."""

    def __init__(self) -> None:
        self.accepted: asyncio.Queue[Connection] = asyncio.Queue()

    async def __call__(self, conn: Connection) -> None:
        self.accepted.put_nowait(conn)

    async def next(self) -> Connection:
        """The next accepted connection."""
        return await asyncio.wait_for(self.accepted.get(), WAIT_S)


class TransportContract:
    """Tests every transport passes. Subclass with ``plugin = "NAME"``; ``settings`` is its
    ``[settings.NAME]`` table."""

    plugin: ClassVar[str]
    settings: ClassVar[Mapping[str, Any]] = {}

    @pytest.fixture
    def transport(self) -> Transport:
        """The transport, built through a fresh plugin manager by its entry-point name."""
        return build_strategy(self.plugin, "transport", self.settings)

    @contextlib.asynccontextmanager
    async def listening(
        self, transport: Transport, handler: ConnectionHandler, max_frame_bytes: int = LIMIT
    ) -> AsyncIterator[Listener]:
        """A listener at the transport's default URL on a free port, closed on the way out."""
        listener = await transport.listen(
            transport.default_url("127.0.0.1", 0), handler, max_frame_bytes=max_frame_bytes
        )
        try:
            yield listener
        finally:
            await listener.close()

    def test_it_is_a_transport_with_its_scheme(self, transport: Transport) -> None:
        """The built strategy is a ``Transport``; its default URL and its listener's URL use its scheme."""
        assert isinstance(transport, Transport)
        assert isinstance(transport.scheme, str) and transport.scheme
        assert isinstance(transport.reachable_remotely, bool)
        assert transport.default_url("127.0.0.1", 0).startswith(f"{transport.scheme}://")

        async def body() -> None:
            async with self.listening(transport, echo) as listener:
                assert listener.url.startswith(f"{transport.scheme}://")
                assert not listener.url.endswith(":0"), "the listener reports port 0, not the port it bound"

        run(body())

    def test_frames_of_several_parts_arrive_whole_and_in_order(self, transport: Transport) -> None:
        """Frames of no parts, empty parts, mixed buffer types and 1 MiB come back byte-exact, in
        order, each as the receiver's own writable ``memoryview``."""
        megabyte = bytes(range(256)) * 4096
        frames = [
            [],
            [b""],
            [b"x"],
            [b"head", bytearray(b"-"), b"", memoryview(b"tail")],
            [megabyte[:100], memoryview(megabyte)[100:]],
        ]

        async def body() -> None:
            async with self.listening(transport, echo) as listener:
                conn = await transport.connect(listener.url, max_frame_bytes=LIMIT)
                try:
                    for parts in frames:
                        await conn.send(parts)
                    for parts in frames:
                        got = await conn.recv()
                        assert isinstance(got, memoryview)
                        assert bytes(got) == b"".join(bytes(p) for p in parts)
                        if got.nbytes:
                            assert not got.readonly
                finally:
                    await conn.close()

        run(body())

    def test_concurrent_clients_get_their_own_frames(self, transport: Transport) -> None:
        """Several clients at once each receive exactly their own frames back."""

        async def client(url: str, number: int) -> None:
            conn = await transport.connect(url, max_frame_bytes=LIMIT)
            try:
                for sequence in range(4):
                    payload = bytes([number, sequence]) * (1 + 5000 * sequence)
                    await conn.send([payload])
                    assert bytes(await conn.recv()) == payload
                    await asyncio.sleep(0)
            finally:
                await conn.close()

        async def body() -> None:
            async with self.listening(transport, echo) as listener:
                await asyncio.gather(*(client(listener.url, n) for n in range(8)))

        run(body())

    def test_a_close_ends_recv_on_both_ends(self, transport: Transport) -> None:
        """A client's close ends the server end's ``recv`` with ``ConnectionClosed``, and its own
        later ``recv``; a server end's close ends the client's pending ``recv``."""

        async def body() -> None:
            ends = Ends()
            async with self.listening(transport, ends) as listener:
                conn = await transport.connect(listener.url, max_frame_bytes=LIMIT)
                server_end = await ends.next()
                await conn.send([b"ping"])
                assert bytes(await server_end.recv()) == b"ping"
                await conn.close()
                with pytest.raises(ConnectionClosed):
                    await server_end.recv()
                with pytest.raises(ConnectionClosed):
                    await conn.recv()
                await server_end.close()

                conn = await transport.connect(listener.url, max_frame_bytes=LIMIT)
                server_end = await ends.next()
                pending = asyncio.ensure_future(conn.recv())
                await asyncio.sleep(0)  # the receive is waiting when the other end closes
                await server_end.close()
                with pytest.raises(ConnectionClosed):
                    await pending
                await conn.close()

        run(body())

    def test_closing_the_listener_keeps_open_connections(self, transport: Transport) -> None:
        """A connection accepted before the listener closes still carries frames both ways."""

        async def body() -> None:
            ends = Ends()
            async with self.listening(transport, ends) as listener:
                conn = await transport.connect(listener.url, max_frame_bytes=LIMIT)
                server_end = await ends.next()
            try:
                await conn.send([b"to server"])
                assert bytes(await server_end.recv()) == b"to server"
                await server_end.send([b"to client"])
                assert bytes(await conn.recv()) == b"to client"
            finally:
                await conn.close()
                await server_end.close()

        run(body())

    def test_frames_over_max_frame_bytes_raise_frame_too_large(self, transport: Transport) -> None:
        """A frame of exactly the receiver's limit arrives; one byte more raises ``FrameTooLarge``
        there. The limit is the connection's ``max_frame_bytes``, also when its owner lowers it."""

        async def body() -> None:
            ends = Ends()
            async with self.listening(transport, ends, max_frame_bytes=1024) as listener:
                conn = await transport.connect(listener.url, max_frame_bytes=LIMIT)
                server_end = await ends.next()
                try:
                    await conn.send([b"a" * 1000, b"b" * 24])
                    assert bytes(await server_end.recv()) == b"a" * 1000 + b"b" * 24
                    await conn.send([b"a" * 1000, b"b" * 25])
                    with pytest.raises(FrameTooLarge):
                        await server_end.recv()
                finally:
                    await conn.close()
                    await server_end.close()

                conn = await transport.connect(listener.url, max_frame_bytes=LIMIT)
                server_end = await ends.next()
                server_end.max_frame_bytes = 16
                try:
                    await conn.send([b"c" * 16])
                    assert bytes(await server_end.recv()) == b"c" * 16
                    await conn.send([b"c" * 17])
                    with pytest.raises(FrameTooLarge):
                        await server_end.recv()
                finally:
                    await conn.close()
                    await server_end.close()

        run(body())
