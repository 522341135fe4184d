"""One server, real clients, over the transport and scheduler the environment selects.

tox runs this once per scheduler x transport; by default it runs with semantic over tcp.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from djinn.client import connect
from djinn.kernel.errors import DjinnError, SessionError
from djinn.engine.models import load_model
from djinn.engine.runner import ModelRunner, greedy_generate
from djinn.kernel.strategies import Residency
from djinn.wire.frames import HEADER_SIZE, Frame, Op, encode_frame
from tests.serving import TRANSPORT, start_server, serving_config

PROMPTS = [[5, 17, 300, 42, 9], [101, 7, 7, 250, 3, 88, 19, 64]]


def local_tokens(spec: str, prompt: list[int], n: int, device: str = "cpu") -> list[int]:
    runner = ModelRunner(load_model(spec, device=device))
    return greedy_generate(runner, runner.new_kv(), runner.ids_tensor(prompt), n)


#: semantic writes back at every IO_WAIT, whatever the free memory: its moves are tested here too
EVERY_IO_WAIT = {"semantic": {"write_back_headroom": 1.0}}


@pytest.fixture(scope="module", params=["random:tiny-llama", "random:tiny-gpt2"])
def server(request):
    srv = start_server(serving_config(request.param, settings=EVERY_IO_WAIT))
    yield srv
    srv.stop()


def kv_bytes(server) -> int:
    return server.call(lambda: server.kernel.memory.device_bytes("kv"))


def test_greedy_generate_matches_local_generation(server):
    spec = server.config.model.name
    with connect(server.url(TRANSPORT)) as client:
        session = client.model().session()
        for prompt in PROMPTS:
            assert session.generate(prompt, max_new_tokens=12).tokens == local_tokens(spec, prompt, 12, server.model.device.type)
            session.close()
            session = client.model().session()


def test_context_stays_on_the_server_between_requests(server):
    spec = server.config.model.name
    runner = ModelRunner(load_model(spec, device=server.model.device.type))
    kv = runner.new_kv()
    first = greedy_generate(runner, kv, runner.ids_tensor(PROMPTS[0]), 4)
    second = greedy_generate(runner, kv, runner.ids_tensor([first[-1], 11, 12]), 4)
    with connect(server.url(TRANSPORT)) as client, client.model().session() as session:
        assert session.generate(PROMPTS[0], max_new_tokens=4).tokens == first
        # the session continues after its last token: the server feeds it before the new input
        assert session.generate([11, 12], max_new_tokens=4).tokens == second


def test_evict_and_restore_keep_outputs_identical(server):
    spec = server.config.model.name
    runner = ModelRunner(load_model(spec, device=server.model.device.type))
    kv = runner.new_kv()
    expected = [greedy_generate(runner, kv, runner.ids_tensor(PROMPTS[1]), 3)]
    for _ in range(3):
        expected.append(greedy_generate(runner, kv, runner.ids_tensor([expected[-1][-1]]), 3))
    with connect(server.url(TRANSPORT)) as client, client.model().session() as session:
        got = [session.generate(PROMPTS[1], max_new_tokens=3).tokens]
        for _ in range(3):
            session.signal_phase("IO_WAIT", expected_s=5.0)
            deadline = time.monotonic() + 2
            scheduler = server.plugins.selection.scheduler
            # semantic moves the KV off the critical path: evicted, or written back (a copy in the
            # tier, the GPU blocks kept until memory is needed)
            moved = False
            while scheduler == "semantic" and not moved and time.monotonic() < deadline:
                info = server.call(lambda: server.kernel.sessions[session.id].info)
                moved = info.residency is Residency.EVICTED or info.backed
                time.sleep(0.01)
            assert moved or scheduler != "semantic"
            session.signal_phase("COMPUTE")
            got.append(session.generate([], max_new_tokens=3).tokens)  # continues after its last token
    assert got == expected


def test_disconnect_mid_generate_frees_the_sessions_kv(server):
    before = kv_bytes(server)
    client = connect(server.url(TRANSPORT))
    session = client.model().session()
    session.generate(PROMPTS[0], max_new_tokens=2)
    assert kv_bytes(server) > before
    # start a long generate and drop the connection while it runs
    asyncio.run_coroutine_threadsafe(session._async.generate(PROMPTS[1], max_new_tokens=200), client._loop.loop)
    time.sleep(0.05)
    client.close()
    deadline = time.monotonic() + 5
    while kv_bytes(server) != before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert kv_bytes(server) == before


def test_bad_requests_get_errors_and_the_server_keeps_serving(server):
    with connect(server.url(TRANSPORT)) as client:
        session = client.model().session()
        with pytest.raises(SessionError, match="token ids must be in"):
            session.generate([10**6], max_new_tokens=1)
        with pytest.raises(SessionError, match="breakpoint layers"):
            session.generate([1, 2], max_new_tokens=1, breakpoints=[99])
        with pytest.raises(SessionError, match="IDLE"):
            client._loop.run(client._async.request(Op.SIGNAL_PHASE, session_id=session.id, meta={"phase": "IDLE"}))
        with pytest.raises(SessionError, match="no open session"):
            client._loop.run(client._async.request(Op.GENERATE, session_id=999, meta={}))
        assert len(session.generate([1, 2, 3], max_new_tokens=2).tokens) == 2


@pytest.mark.skipif(TRANSPORT != "tcp", reason="raw bytes need a socket")
def test_malformed_frames_over_tcp_get_error_replies(server):
    from djinn.plugins.serializers.arrow import ArrowSerializer, ArrowSettings

    host, port = server.url("tcp").removeprefix("tcp://").rsplit(":", 1)
    serializer = ArrowSerializer(ArrowSettings())

    def send(sock, body: bytes) -> None:
        sock.sendall(len(body).to_bytes(8, "little") + body)

    def recv(sock) -> bytes:
        size = int.from_bytes(sock.recv(8, socket.MSG_WAITALL), "little")
        return sock.recv(size, socket.MSG_WAITALL)

    with socket.create_connection((host, int(port)), timeout=10) as sock:
        send(sock, b"".join(encode_frame(Frame(Op.HELLO, meta={"token": ""}), serializer)))
        assert recv(sock)[4 + 1] == Op.WELCOME
        good = b"".join(encode_frame(Frame(Op.PING, request_id=7), serializer))
        for bad in (good[:HEADER_SIZE - 3], b"XXXX" + good[4:], good[:5] + bytes([250]) + good[6:],
                    good + b"junk", b"\x80\x04\x95pickle"):
            send(sock, bad)
            reply = recv(sock)
            assert reply[5] == Op.ERROR, bad
        send(sock, good)
        assert recv(sock)[5] == Op.OK
    # another client is unaffected
    with connect(server.url(TRANSPORT)) as client, client.model().session() as session:
        assert len(session.generate([4, 5], max_new_tokens=2).tokens) == 2


def test_status_reports_memory_and_sessions(server):
    with connect(server.url(TRANSPORT)) as client:
        session = client.model().session()
        session.generate([1, 2, 3], max_new_tokens=1)
        status = client.status()
    assert status["sessions"]["total"] >= 1
    assert status["memory"]["device"]["weights"] > 0
    assert "pinned_host" in status["tiers"]


def test_generate_on_a_model_saved_to_a_directory(tmp_path):
    loaded = load_model("random:tiny-llama", seed=3)
    loaded.model.save_pretrained(tmp_path / "model")
    srv = start_server(serving_config(str(tmp_path / "model")))
    expected = local_tokens(str(tmp_path / "model"), PROMPTS[0], 8, srv.model.device.type)
    try:
        with connect(srv.url(TRANSPORT)) as client, client.model().session() as session:
            assert session.generate(PROMPTS[0], max_new_tokens=8).tokens == expected
    finally:
        srv.stop()


def test_concurrent_sessions_share_decode_steps_and_stay_token_exact(server):
    spec = server.config.model.name
    prompts = [[(7 * i + j) % 500 + 1 for j in range(3 + 5 * i)] for i in range(6)]
    expected = [local_tokens(spec, p, 16, server.model.device.type) for p in prompts]
    steps_before = server.call(lambda: server.model.engine.steps)
    rows_before = server.call(lambda: server.model.engine.batch_rows)

    async def run_all(url: str) -> list[list[int]]:
        from djinn.client import connect_async

        async with await connect_async(url) as client:
            model = await client.model()
            sessions = [await model.session() for _ in prompts]
            results = await asyncio.gather(*(s.generate(p, max_new_tokens=16) for s, p in zip(sessions, prompts)))
            return [r.tokens for r in results]

    assert asyncio.run(run_all(server.url(TRANSPORT))) == expected
    steps = server.call(lambda: server.model.engine.steps) - steps_before
    rows = server.call(lambda: server.model.engine.batch_rows) - rows_before
    assert rows / steps > 1.5  # decode steps were shared, not taken one session at a time


def _fails_alone(server, failing_request, match: str, then=None) -> list[int]:
    """``failing_request(session)`` joins while another connection's session decodes 200 tokens: it
    must fail with an error matching ``match`` (then ``then(session)`` runs), and the decoding
    session must still get its exact tokens. The two session ids."""
    from djinn.client import connect_async

    expected = local_tokens(server.config.model.name, PROMPTS[1], 200, server.model.device.type)

    ids = []

    async def run(url: str) -> list[int]:
        async with await connect_async(url) as a, await connect_async(url) as b:
            innocent = await (await a.model()).session()
            failing = await (await b.model()).session()
            ids.extend((innocent.id, failing.id))
            decoding = asyncio.create_task(innocent.generate(PROMPTS[1], max_new_tokens=200))
            await asyncio.sleep(0.05)  # the innocent session is decoding when the failing one joins
            with pytest.raises(DjinnError, match=match):
                await asyncio.wait_for(failing_request(failing), 30)
            if then is not None:
                await then(failing)
            return (await asyncio.wait_for(decoding, 30)).tokens

    assert asyncio.run(run(server.url(TRANSPORT))) == expected
    return ids


def test_a_request_whose_sampling_fails_fails_alone(server):
    """A temperature so small that the probabilities overflow to NaN: that request gets an error
    reply, the session stays usable, and both sessions are freed after."""
    before = kv_bytes(server)

    async def still_usable(session) -> None:
        assert len((await session.generate([4, 5], max_new_tokens=2)).tokens) == 2

    ids = _fails_alone(server, lambda s: s.generate(PROMPTS[0], max_new_tokens=8, temperature=1e-300), "nan",
                       then=still_usable)

    def held() -> bool:
        return server.call(lambda: any(i in server.kernel.sessions for i in ids))

    deadline = time.monotonic() + 5
    while held() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not held() and kv_bytes(server) <= before  # both freed with their connections


def test_a_session_running_out_of_positions_fails_alone(server):
    """A context that reaches the model's position limit mid-decode ends that request alone."""
    limit = server.model.runner.max_positions
    if limit is None:
        pytest.skip(f"{server.config.model.name} has no position limit")
    _fails_alone(server, lambda s: s.generate([7] * (limit - 4), max_new_tokens=100), "positions")
