"""Request arguments at the edges of their types, and a plugin installed from a distribution that
fails in a connection or metrics hook: each gets a named error reply, never an ``internal`` one,
and the server serves on."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from djinn.client import connect
from djinn.kernel.errors import PluginError, SessionError
from djinn.kernel.hookspecs import hookimpl
from djinn.kernel.plugins import get_plugin_manager
from djinn.server.launch import BackgroundServer
from djinn.kernel.strategies import Residency
from djinn.wire.frames import Frame, Op
from djinn.plugins.transports._framing import LENGTH_PREFIX
from eval.reliability.run import PROMPT, RawClient, frame_bytes, start_server
from tests.serving import serving_config
from tests.test_plugins import FakeEntryPoint

HUGE = 10**400  # a JSON integer no float can hold
WAIT_S = 30.0  # bounds a hang; a working server never comes near it


def wait_until(condition, what: str = "the condition") -> None:
    """Poll ``condition`` until it holds; fail after ``WAIT_S`` (a hang, not a slow run)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"{what} never held"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def server():
    srv = start_server(serving_config(), ["semantic", "tcp"])
    yield srv
    srv.stop()


def _request(client, op: Op, session_id: int, meta: dict, tensors=()):
    return client._loop.run(client._async.request(op, session_id=session_id, meta=meta, tensors=tensors))


@pytest.mark.parametrize("meta", [
    {"seed": 1 << 64}, {"seed": -(1 << 63) - 1}, {"seed": "7"}, {"seed": True}, {"seed": 1.5},
    {"temperature": HUGE}, {"temperature": True}, {"breakpoints": [True]}, {"breakpoints": [False, 1]},
], ids=["seed-2**64", "seed-below-int64", "seed-text", "seed-bool", "seed-float", "temperature-huge",
        "temperature-bool", "breakpoint-bool", "breakpoints-with-a-bool"])
def test_generate_arguments_out_of_range_are_session_errors(server, meta, caplog):
    with connect(server.url("tcp")) as client, client.model().session() as session:
        with caplog.at_level(logging.ERROR, logger="djinn"), pytest.raises(SessionError):
            _request(client, Op.GENERATE, session.id, {"max_new_tokens": 2, "temperature": 1.0, **meta},
                     (torch.tensor(PROMPT),))
        assert caplog.records == []  # refused as a bad request, not failed inside the server
        assert len(session.generate(PROMPT, max_new_tokens=2).tokens) == 2


def test_seeds_at_both_ends_of_the_range_sample_reproducibly(server):
    with connect(server.url("tcp")) as client:
        for seed in ((1 << 64) - 1, -(1 << 63)):
            runs = []
            for _ in range(2):
                with client.model().session() as session:
                    runs.append(session.generate(PROMPT, max_new_tokens=6, temperature=1.0, seed=seed).tokens)
            assert runs[0] == runs[1] and len(runs[0]) == 6


@pytest.mark.parametrize("expected_s", [HUGE, True, "soon", -1], ids=["huge", "bool", "text", "negative"])
def test_phase_arguments_out_of_range_are_session_errors(server, expected_s, caplog):
    with connect(server.url("tcp")) as client, client.model().session() as session:
        with caplog.at_level(logging.ERROR, logger="djinn"), pytest.raises(SessionError, match="expected_s"):
            _request(client, Op.SIGNAL_PHASE, session.id, {"phase": "IO_WAIT", "expected_s": expected_s})
        assert caplog.records == []
        session.signal_phase("IO_WAIT", expected_s=1e300)  # large but finite is a valid promise
        session.signal_phase("COMPUTE")


def test_an_edit_factor_out_of_range_is_a_session_error(server, caplog):
    with connect(server.url("tcp")) as client, client.model().session() as session:
        hits = 0
        with caplog.at_level(logging.ERROR, logger="djinn"):
            for hit in session.trace(PROMPT, max_new_tokens=1, breakpoints=[1]):
                with pytest.raises(SessionError, match="factor"):
                    _request(client, Op.EDIT, session.id, {"op": "scale", "factor": HUGE})
                hit.scale(1.0)
                hits += 1
        assert hits == 1 and caplog.records == []


class _Faulty:
    """Raises in each hook named in ``armed``."""

    def __init__(self) -> None:
        self.armed: set[str] = set()

    def _raise(self, hook: str) -> None:
        if hook in self.armed:
            raise RuntimeError("kaboom")

    @hookimpl
    def djinn_connection_opened(self, peer, transport):
        self._raise("djinn_connection_opened")

    @hookimpl
    def djinn_metrics(self, kernel):
        self._raise("djinn_metrics")

    @hookimpl
    def djinn_session_restored(self, session, tier, nbytes, seconds, on_critical_path):
        self._raise("djinn_session_restored")


@pytest.fixture
def faulty_server():
    """A server with ``faulty`` installed as the distribution faulty-pkg 0.3 and selected."""
    faulty = _Faulty()
    entry_points = [*importlib.metadata.entry_points(group="djinn.plugins"),
                    FakeEntryPoint("faulty", lambda: faulty, dist="faulty-pkg", version="0.3")]
    config = serving_config(settings={"semantic": {"write_back": False}})  # IO_WAIT evicts
    plugins = get_plugin_manager(config, ["semantic", "tcp", "faulty"], entry_points=entry_points)
    srv = BackgroundServer(config, plugins).start()
    yield srv, faulty
    srv.stop()


def test_a_plugin_failing_as_a_client_connects_fails_its_hello_by_name(faulty_server, caplog):
    srv, faulty = faulty_server
    with connect(srv.url("tcp")) as bystander, bystander.model().session() as session:
        expected = session.generate(PROMPT, max_new_tokens=3).tokens
        faulty.armed = {"djinn_connection_opened"}
        with caplog.at_level(logging.ERROR, logger="djinn"), pytest.raises(PluginError) as refused:
            connect(srv.url("tcp"))
        faulty.armed = set()
        assert "faulty (faulty-pkg 0.3)" in str(refused.value) and "kaboom" in str(refused.value)
        assert any("faulty (faulty-pkg 0.3)" in r.getMessage() for r in caplog.records), caplog.text
        assert srv.call(lambda: len(srv.kernel.sessions)) == 1  # the bystander's, nothing of the refused one
        assert session.generate([expected[-1]], max_new_tokens=1).tokens  # the bystander is served on
    with connect(srv.url("tcp")) as client, client.model().session() as session:
        assert session.generate(PROMPT, max_new_tokens=3).tokens == expected


def test_a_plugin_failing_in_metrics_fails_the_status_request_by_name(faulty_server, caplog):
    srv, faulty = faulty_server
    with connect(srv.url("tcp")) as client:
        faulty.armed = {"djinn_metrics"}
        with caplog.at_level(logging.ERROR, logger="djinn"), pytest.raises(PluginError) as failed:
            client.status()
        faulty.armed = set()
        assert "faulty (faulty-pkg 0.3)" in str(failed.value) and "djinn_metrics" in str(failed.value)
        assert any("faulty (faulty-pkg 0.3)" in r.getMessage() for r in caplog.records), caplog.text
        assert client.status()["sessions"]["total"] == 0


def test_a_plugin_failing_as_a_session_is_restored_fails_that_request_by_name(faulty_server, caplog):
    srv, faulty = faulty_server
    with connect(srv.url("tcp")) as client, client.model().session() as session:
        first = session.generate(PROMPT, max_new_tokens=2).tokens
        session.signal_phase("IO_WAIT")  # the semantic scheduler evicts it at once
        wait_until(lambda: srv.call(lambda: srv.kernel.get(session.id).info.residency) is Residency.EVICTED,
                   "the eviction")
        faulty.armed = {"djinn_session_restored"}
        failure = None
        with caplog.at_level(logging.ERROR):
            try:
                session.generate([first[-1]], max_new_tokens=1)  # restores on the critical path
            except PluginError as exc:
                failure = exc
        faulty.armed = set()
        assert failure is not None and "faulty (faulty-pkg 0.3)" in str(failure)
        assert any("faulty (faulty-pkg 0.3)" in r.getMessage() for r in caplog.records), caplog.text


def _serving_requests() -> int:
    return sum(1 for task in asyncio.all_tasks() if task.get_coro().__qualname__ == "Server._serve_request")


def test_a_client_that_never_reads_its_replies_holds_a_bounded_number_of_requests():
    """Requests past ``max_requests_per_connection`` wait unread in the socket (back-pressure)
    instead of piling up as tasks and replies on the server; each is still answered in the end."""
    srv = start_server(serving_config(max_requests_per_connection=8, settings={"tcp": {"send_buffer_bytes": 4096}}),
                       ["semantic", "tcp"])
    try:
        client = RawClient(srv.url("tcp"), timeout=WAIT_S)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        count = 2000
        status = frame_bytes(Frame(Op.STATUS))
        sender = threading.Thread(target=client.sock.sendall,
                                  args=((LENGTH_PREFIX.pack(len(status)) + status) * count,), daemon=True)
        sender.start()
        # the replies fill the (small) socket buffers, the client reads none of them: the server
        # reaches its limit of requests in flight for this connection and goes no further
        wait_until(lambda: srv.call(_serving_requests) == 8, "8 requests in flight")
        for _ in range(20):
            assert srv.call(_serving_requests) <= 8
        with connect(srv.url("tcp")) as other, other.model().session() as session:
            assert len(session.generate(PROMPT, max_new_tokens=2).tokens) == 2  # others are served
        assert srv.call(_serving_requests) == 8  # while the unread client's requests still wait
        assert all(client.recv().op is Op.RESULT for _ in range(count))  # and every request is answered
        sender.join(timeout=WAIT_S)
        client.close()
    finally:
        srv.stop()


def test_closing_a_session_paused_at_a_breakpoint_ends_its_pass_with_a_session_error(server, caplog):
    with connect(server.url("tcp")) as client:
        session = client.model().session()
        kv_before = server.call(lambda: server.kernel.memory.device_bytes("kv"))
        with caplog.at_level(logging.ERROR, logger="djinn"), pytest.raises(SessionError, match="closed while paused"):
            for _hit in session.trace(PROMPT, max_new_tokens=3, breakpoints=[1]):
                session.close()
        assert caplog.records == []  # an answer, not a failure inside the server
        assert server.call(lambda: session.id not in server.kernel.sessions)
        assert server.call(lambda: server.kernel.memory.device_bytes("kv")) <= kv_before
        with client.model().session() as other:
            assert len(other.generate(PROMPT, max_new_tokens=2).tokens) == 2


def test_a_connection_that_never_says_hello_is_closed_after_hello_timeout_s():
    srv = start_server(serving_config(hello_timeout_s=0.3), ["semantic", "tcp"])
    try:
        hello = frame_bytes(Frame(Op.HELLO, meta={"token": ""}))
        for cut in (None, 20):  # silent, and a HELLO cut short
            client = RawClient(srv.url("tcp"), hello=False, timeout=WAIT_S)
            if cut is not None:
                client.send_bytes(hello[:cut], announced=len(hello))
            reply = client.recv()
            if reply is not None:  # the silent one is told why
                assert reply.meta["code"] == "auth" and "no HELLO" in reply.meta["message"]
            # closed by the server: a connection left open would raise TimeoutError here instead
            assert client.recv() is None
            client.close()
        with connect(srv.url("tcp")) as client, client.model().session() as session:
            time.sleep(0.5)  # longer than hello_timeout_s: an authenticated connection is not timed out
            assert len(session.generate(PROMPT, max_new_tokens=2).tokens) == 2
    finally:
        srv.stop()


def test_before_its_hello_a_client_cannot_make_the_server_hold_a_large_frame(server):
    client = RawClient(server.url("tcp"), hello=False, timeout=WAIT_S)
    client.send_bytes(frame_bytes(Frame(Op.HELLO, meta={"token": ""})), announced=100 << 20)
    # refused on the announced length alone: closed without a reply. A server waiting for the
    # 100 MB would time the HELLO out (after hello_timeout_s) and answer "no HELLO" instead.
    assert client.recv() is None
    client.close()
    with connect(server.url("tcp")) as client:  # once authenticated, large frames are accepted
        big = torch.zeros(1 << 18)  # 1 MiB, far above the limit before the HELLO
        reply = client._loop.run(client._async.request(Op.PING, tensors=(big,)))
        assert reply.op is Op.OK


FREEZE_PROBE = """
import gc
from tests.serving import serving_config, start_server
before = gc.get_freeze_count()
server = start_server(serving_config(freeze_gc_heap=True))
during = gc.get_freeze_count()
server.stop()
print(before, during, gc.get_freeze_count())
"""


def test_a_serving_process_freezes_its_start_up_heap_until_the_server_stops():
    # in a process of its own: servers of other tests in this one keep the heap frozen
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", FREEZE_PROBE], cwd=root, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    before, during, after = map(int, out.split()[-3:])
    # the kernel, the model and the plugins, alive since start-up: no collection walks them
    assert before == 0 and during > 1000 and after == 0
