"""The native client against a real server: continuing sessions, streaming, stopping, timeouts."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading

import pytest

from djinn.client import RequestTimeout, connect, connect_async
from djinn.kernel.errors import SessionError
from djinn.wire.errors import ConnectionClosed
from tests.serving import serving_config, start_server

MODEL = "random:tiny-llama"


@pytest.fixture(scope="module")
def server():
    srv = start_server(serving_config(MODEL), overrides=["tcp"])
    yield srv
    srv.stop()


@pytest.fixture()
def session(server):
    with connect(server.url("tcp")) as client, client.model().session() as session:
        yield session


def test_two_turns_equal_one_generate_over_the_concatenation(server):
    first, second = [11, 12, 13, 14], [21, 22, 23]
    with connect(server.url("tcp")) as client:
        model = client.model()
        with model.session() as turns:
            turn1 = turns.generate(first, max_new_tokens=6).tokens
            turn2 = turns.generate(second, max_new_tokens=6).tokens
        with model.session() as once:
            whole = once.generate([*first, *turn1, *second], max_new_tokens=6).tokens
    assert turn2 == whole
    assert len(turn1) == 6


def test_the_kv_holds_exactly_the_recorded_history(server, session):
    session.generate([5, 6, 7], max_new_tokens=4)
    kernel_session = server.call(lambda: server.kernel.get(session.id))
    history, length = server.call(lambda: (list(kernel_session.history), kernel_session.kv.length))
    assert len(history) == length == 3 + 3  # the prompt and every generated token but the pending last


def test_an_unknown_phase_is_refused_before_sending(session):
    with pytest.raises(SessionError, match="IO_WAIT") as info:
        session.signal_phase("IOWAIT")
    assert "COMPUTE" in str(info.value)
    session.signal_phase("IO_WAIT", expected_s=1.0)
    session.signal_phase("COMPUTE")
    assert session.generate([1, 2], max_new_tokens=2).tokens


def test_the_server_refuses_an_unknown_phase_too(server):
    async def run() -> None:
        async with connect_async(server.url("tcp")) as client:
            session = await (await client.model()).session()
            from djinn.wire.frames import Op

            with pytest.raises(SessionError, match="COMPUTE"):
                await client.request(Op.SIGNAL_PHASE, session_id=session.id, meta={"phase": "IOWAIT"})

    asyncio.run(run())


def test_float_token_ids_are_refused(session):
    with pytest.raises(SessionError, match="integers"):
        session.generate([1.5], max_new_tokens=2)
    import torch

    with pytest.raises(SessionError, match="integers"):
        session.generate(torch.tensor([1.0, 2.0]), max_new_tokens=2)


def test_max_new_tokens_past_the_positions_is_refused():
    srv = start_server(serving_config("random:tiny-gpt2"), overrides=["tcp"])
    try:
        positions = srv.model.runner.max_positions
        with connect(srv.url("tcp")) as client, client.model().session() as session:
            with pytest.raises(SessionError, match="positions"):
                session.generate([1, 2, 3], max_new_tokens=positions)
            assert len(session.generate([1, 2, 3], max_new_tokens=2).tokens) == 2  # still served
    finally:
        srv.stop()


def test_stream_yields_the_generated_tokens_in_order(server, session):
    expected = None
    with connect(server.url("tcp")) as client, client.model().session() as other:
        expected = other.generate([3, 4, 5], max_new_tokens=8).tokens
    stream = session.stream([3, 4, 5], max_new_tokens=8)
    assert list(stream) == expected
    assert stream.result.tokens == expected


def test_stop_sequences_end_the_request_early(server, session):
    with connect(server.url("tcp")) as client, client.model().session() as other:
        full = other.generate([9, 8, 7], max_new_tokens=10).tokens
    stop = full[2:4]
    end = next(i + 2 for i in range(len(full)) if full[i : i + 2] == stop)  # its first occurrence
    out = session.generate([9, 8, 7], max_new_tokens=10, stop=[stop])
    assert out.finish_reason == "stop"
    assert out.tokens == full[:end]
    assert session.generate([1], max_new_tokens=3).finish_reason == "length"


def test_logprobs_and_top_logprobs(session):
    out = session.generate([4, 4, 4], max_new_tokens=3, logprobs=2)
    assert len(out.logprobs) == 3
    for token, entry in zip(out.tokens, out.logprobs):
        assert entry.logprob <= 0
        assert len(entry.top) == 2
        assert entry.top[0][0] == token  # greedy picks the most likely token
        assert entry.top[0][1] == pytest.approx(entry.logprob)


def test_top_p_sampling_is_seeded_and_validated(session):
    a = session.generate([1, 2], max_new_tokens=5, temperature=1.0, top_p=0.5, seed=7).tokens
    with pytest.raises(SessionError, match="top_p"):
        session.generate([1, 2], max_new_tokens=5, temperature=1.0, top_p=0.0)
    assert len(a) == 5


def test_connect_to_a_silent_port_times_out():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        with pytest.raises(ConnectionClosed, match="no answer"):
            connect(f"tcp://127.0.0.1:{port}", timeout=0.5)
    finally:
        listener.close()


def test_a_request_timeout_raises_and_the_connection_stays_usable(server):
    """A request queued behind the session's own paused pass cannot finish: it times out, and the
    connection and the session serve on once the pass resumes."""

    async def run() -> list[int]:
        async with connect_async(server.url("tcp")) as client:
            session = await (await client.model()).session()
            trace = session.trace([1, 2], max_new_tokens=2, breakpoints=[1])
            await trace.__anext__()  # paused: the session is held until the pass resumes
            with pytest.raises(RequestTimeout, match="0.2 s"):
                await session.generate([3], max_new_tokens=2, timeout=0.2)
            async for _ in trace:
                pass
            return (await session.generate([4], max_new_tokens=2)).tokens

    assert len(asyncio.run(run())) == 2


def test_the_blocking_client_times_out_too(session):
    with pytest.raises(RequestTimeout):
        session.generate([1, 2], max_new_tokens=3, breakpoints=[1], on_break=lambda hit: hit.resume(),
                         timeout=0.0)
    assert len(session.generate([4], max_new_tokens=2).tokens) == 2


def test_async_with_connect_async_and_a_cancelled_request(server):
    async def run() -> list[int]:
        async with connect_async(server.url("tcp")) as client:
            session = await (await client.model()).session()
            task = asyncio.create_task(session.generate([1, 2], max_new_tokens=2000))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return (await session.generate([3], max_new_tokens=3)).tokens

    assert len(asyncio.run(run())) == 3


def test_a_lost_connection_leaves_no_unretrieved_task_exception(server):
    seen: list[dict] = []

    async def run() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: seen.append(context))
        client = await connect_async(server.url("tcp"))
        session = await (await client.model()).session()
        trace = session.trace([1, 2], max_new_tokens=50, breakpoints=[1])
        hit = await trace.__anext__()
        assert hit.layer == 1
        await client._conn.close()  # the connection drops under a paused request
        with pytest.raises(ConnectionClosed):
            async for _ in trace:
                pass
        stream = session.stream([1], max_new_tokens=2)
        with pytest.raises(ConnectionClosed):
            async for _ in stream:
                pass
        await client.close()
        del trace, stream
        gc.collect()
        await asyncio.sleep(0)

    thread = threading.Thread(target=lambda: asyncio.run(run()))
    thread.start()
    thread.join(30)
    gc.collect()
    assert not [c for c in seen if "never retrieved" in str(c.get("message"))]
