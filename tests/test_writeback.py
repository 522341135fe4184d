"""Write-back residency through a real server, and the semantic scheduler's decisions around it:
a written-back session keeps its GPU blocks, resumes with no copy, and under pressure is freed
with none; the learned resume estimate; victims; the deadline order of waiting prompts and the
prefill cap while decoding."""

from __future__ import annotations

import collections
import time

import attrs
import pytest

from djinn.client import connect
from djinn.engine.batch import BatchEngine, EngineRequest
from djinn.kernel.hookspecs import hookimpl
from djinn.kernel.strategies import ActionKind, MemoryView, Phase, Residency, SchedulerView, SessionInfo
from djinn.plugins.schedulers.semantic import SemanticScheduler, SemanticSettings
from eval.reliability.run import PROMPT, kv_budget_gb, kv_sizes
from tests.serving import serving_config
from tests.test_kernel import _local_turns, serve_with, wait_for

#: write back at every IO_WAIT, whatever the free memory
WRITE_BACK = {"semantic": {"write_back": True, "write_back_headroom": 1.0}}


def _count_copies(server) -> collections.Counter:
    """Count the kernel's calls of the engine's ``copy_out`` / ``copy_in`` from now on."""
    calls: collections.Counter = collections.Counter()
    model = server.model
    for name in ("copy_out", "copy_in"):
        real = getattr(model, name)

        async def counted(kv, host, _real=real, _name=name):
            calls[_name] += 1
            await _real(kv, host)

        setattr(model, name, counted)
    return calls


def _state(server, session_id):
    def read():
        s = server.kernel.get(session_id)
        return s.info.residency, s.info.backed, s.tier
    return server.call(read)


class _WriteBacks:
    """Hears ``djinn_session_written_back``: (session id, tier, bytes) per write-back."""

    def __init__(self) -> None:
        self.heard: list[tuple[int, str, int]] = []

    @hookimpl
    def djinn_session_written_back(self, session, tier, nbytes, seconds) -> None:
        assert seconds >= 0
        self.heard.append((session.id, tier, nbytes))


def test_a_written_back_session_keeps_its_blocks_and_resumes_moving_no_bytes():
    server = serve_with(serving_config(settings=WRITE_BACK), ["semantic", "tcp"])
    kernel = server.kernel
    copies = _count_copies(server)
    listener = _WriteBacks()
    server.plugins.pm.register(listener, name="write-back-listener")
    heard = listener.heard
    try:
        with connect(server.url("tcp")) as client, client.model().session() as session:
            first = session.generate(PROMPT, max_new_tokens=2).tokens
            held = server.call(lambda: kernel.memory.device_bytes("kv"))
            session.signal_phase("IO_WAIT", expected_s=30)
            assert wait_for(lambda: server.call(lambda: kernel.counters["write_backs"]) == 1)
            assert _state(server, session.id) == (Residency.RESIDENT, True, "pinned_host")
            assert wait_for(lambda: len(heard) == 1)
            assert heard == [(session.id, "pinned_host", held)]
            # both copies are accounted: the device bytes stay, the tier holds as many
            assert server.call(lambda: kernel.memory.device_bytes("kv")) == held
            assert server.call(lambda: kernel.memory.tier_bytes("pinned_host")) == held
            assert server.call(lambda: kernel.counters["evictions"]) == 0  # the KV did not leave the GPU
            session.signal_phase("COMPUTE")
            second = session.generate([first[-1]], max_new_tokens=2).tokens
            assert len(second) == 2
            assert copies == {"copy_out": 1}  # the write-back, and nothing back
            assert _state(server, session.id) == (Residency.RESIDENT, False, None)
            assert server.call(lambda: kernel.memory.tier_bytes("pinned_host")) == 0
            assert server.call(lambda: kernel.tiers["pinned_host"].stats().allocations) == 0
            counters = server.call(lambda: dict(kernel.counters))
            assert counters["restores"] == 0 and counters["reclaims"] == 0
    finally:
        server.stop()


def test_under_pressure_a_written_back_session_is_reclaimed_without_a_copy_and_restores_exact():
    """Room for two sessions' KV: a third's request frees the written-back one at once (no copy
    on its path); that session's next turn restores from the tier and picks the same tokens as a
    session that never left the GPU."""
    config = serving_config(budget_gb=kv_budget_gb("random:tiny-llama", 2, 64), settings=WRITE_BACK)
    config = attrs.evolve(config, memory=attrs.evolve(config.memory, admission_queue=0))
    server = serve_with(config, ["semantic", "tcp"])
    kernel = server.kernel
    turns = [[11, 12, 13, 14, 15], [21, 22]]
    expected = _local_turns(server, turns, 8)
    try:
        with connect(server.url("tcp")) as client:
            model = client.model()
            first, second, third = (model.session() for _ in range(3))
            got = [first.generate(turns[0], max_new_tokens=8).tokens]
            first.signal_phase("IO_WAIT", expected_s=30)
            assert wait_for(lambda: server.call(lambda: kernel.counters["write_backs"]) == 1)
            second.generate([1, 2, 3], max_new_tokens=8)
            copies = _count_copies(server)
            third.generate([4, 5, 6], max_new_tokens=8)  # needs room: the backed session goes first
            assert copies == {}  # reclaimed: no copy at all on the third's path
            assert _state(server, first.id) == (Residency.EVICTED, False, "pinned_host")
            assert _state(server, second.id)[0] is Residency.RESIDENT
            counters = server.call(lambda: dict(kernel.counters))
            assert counters["reclaims"] == 1 and counters["evictions"] == 1 and counters["evict_failures"] == 0
            snapshot = server.call(lambda: kernel.memory.snapshot())
            assert snapshot["device_used_bytes"] <= snapshot["budget_bytes"]
            assert snapshot["tiers"]["pinned_host"] == server.call(lambda: kernel.get(first.id).block.nbytes)
            first.signal_phase("COMPUTE")
            got.append(first.generate(turns[1], max_new_tokens=8).tokens)  # after its pending last token
            assert got == expected
            assert copies["copy_in"] == 1
            assert server.call(lambda: kernel.counters["restores"]) == 1
    finally:
        server.stop()


def test_write_back_with_every_tier_full_counts_a_skip_and_keeps_the_session_resident():
    server = serve_with(serving_config(tier_gb=4096 / 2**30, settings=WRITE_BACK), ["semantic", "tcp"])  # 4 KiB
    try:
        with connect(server.url("tcp")) as client, client.model().session() as session:
            session.generate(PROMPT, max_new_tokens=2)
            session.signal_phase("IO_WAIT")
            assert wait_for(lambda: server.call(lambda: server.kernel.counters["write_back_skips"]) == 1)
            assert server.call(lambda: server.kernel.counters["evict_failures"]) == 0
            assert _state(server, session.id) == (Residency.RESIDENT, False, None)
            assert len(session.generate([1], max_new_tokens=1).tokens) == 1
    finally:
        server.stop()


# --------------------------------------------------------------------------- the scheduler alone


def _info(id_: int, **kw) -> SessionInfo:
    return SessionInfo(id=id_, created_at=0.0, **kw)


def _view(now: float, *sessions: SessionInfo) -> SchedulerView:
    return SchedulerView(now=now, sessions=sessions, memory=MemoryView(1 << 30, 1 << 20, {}, 0))


def test_io_wait_writes_back_and_prefetches_from_the_hint_else_from_the_learned_gaps():
    scheduler = SemanticScheduler(SemanticSettings(write_back=True, prefetch_margin_s=0.5))
    hinted = _info(1, phase=Phase.IO_WAIT, expected_resume_at=110.0)
    actions = scheduler.on_phase(hinted, _view(100.0))
    assert [(a.kind, a.at) for a in actions] == [(ActionKind.WRITE_BACK, None), (ActionKind.RESTORE, 109.5)]
    waiting = _info(2, phase=Phase.IO_WAIT)
    assert [a.kind for a in scheduler.on_phase(waiting, _view(100.0))] == [ActionKind.WRITE_BACK]  # nothing learned yet
    computing = attrs.evolve(waiting, phase=Phase.COMPUTE)
    assert scheduler.on_phase(computing, _view(104.0)) == []  # resident: nothing to restore
    scheduler.on_phase(waiting, _view(200.0))
    scheduler.on_phase(computing, _view(202.0))
    assert scheduler.expected_wait_s(2) == pytest.approx(3.0)  # the mean of 4 s and 2 s
    actions = scheduler.on_phase(waiting, _view(300.0))
    assert [(a.kind, a.at) for a in actions] == [(ActionKind.WRITE_BACK, None), (ActionKind.RESTORE, 302.5)]
    evicted = attrs.evolve(computing, residency=Residency.EVICTED)
    assert [a.kind for a in scheduler.on_phase(evicted, _view(303.0))] == [ActionKind.RESTORE]


def test_io_wait_writes_back_by_default_when_memory_is_short_and_evicts_without_write_back():
    waiting = _info(1, phase=Phase.IO_WAIT)
    assert [a.kind for a in SemanticScheduler(SemanticSettings()).on_phase(waiting, _view(1.0))] == [
        ActionKind.WRITE_BACK]
    scheduler = SemanticScheduler(SemanticSettings(write_back=False))
    assert [a.kind for a in scheduler.on_phase(waiting, _view(1.0))] == [ActionKind.EVICT]


def _memory_view(now: float, *sessions: SessionInfo, free: int, tier_free: int = 10_000) -> SchedulerView:
    """A device budget of 1,000 bytes with ``free`` of them free, one tier with ``tier_free``."""
    return SchedulerView(now=now, sessions=sessions, memory=MemoryView(1000, free, {"pinned_host": tier_free}, 0))


def test_io_wait_writes_back_only_while_free_and_reclaimable_bytes_are_under_the_headroom():
    scheduler = SemanticScheduler(SemanticSettings(write_back_headroom=0.25))  # 250 of 1,000 bytes
    waiting = _info(1, phase=Phase.IO_WAIT, kv_bytes=100, expected_resume_at=30.0)
    assert [a.kind for a in scheduler.on_phase(waiting, _memory_view(10.0, free=600))] == [ActionKind.RESTORE]
    assert [a.kind for a in scheduler.on_phase(waiting, _memory_view(10.0, free=200))] == [
        ActionKind.WRITE_BACK, ActionKind.RESTORE]
    backed = _info(2, kv_bytes=30, backed=True)
    moving = _info(3, kv_bytes=20, residency=Residency.EVICTING)
    view = _memory_view(10.0, backed, moving, free=200)  # 200 free + 50 reclaimable: the headroom
    assert scheduler.headroom_deficit(view) == 0
    assert [a.kind for a in scheduler.on_phase(waiting, view)] == [ActionKind.RESTORE]
    everywhere = SemanticScheduler(SemanticSettings(write_back_headroom=1.0))
    assert [a.kind for a in everywhere.on_phase(waiting, _memory_view(10.0, free=1000))][0] is ActionKind.WRITE_BACK
    nowhere = SemanticScheduler(SemanticSettings(write_back_headroom=0.0))
    assert [a.kind for a in nowhere.on_phase(waiting, _memory_view(10.0, free=0))] == [ActionKind.RESTORE]
    with pytest.raises(ValueError, match="write_back_headroom"):
        SemanticSettings(write_back_headroom=1.5)


def test_the_tick_writes_back_waiting_sessions_expected_back_last_first_until_the_headroom_is_covered():
    scheduler = SemanticScheduler(SemanticSettings(write_back_headroom=0.5, idle_threshold_s=0))
    soon = _info(1, phase=Phase.IO_WAIT, kv_bytes=100, expected_resume_at=20.0)
    late = _info(2, phase=Phase.IO_WAIT, kv_bytes=100, expected_resume_at=90.0)
    unknown = _info(3, phase=Phase.IO_WAIT, kv_bytes=100)  # no hint, nothing learned: back last
    busy = _info(4, phase=Phase.IO_WAIT, kv_bytes=100, busy=True)
    backed = _info(5, phase=Phase.IO_WAIT, kv_bytes=100, backed=True)
    computing = _info(6, kv_bytes=100)
    sessions = (soon, late, unknown, busy, backed, computing)
    written = lambda view: [(a.kind, a.session_id) for a in scheduler.on_tick(view)]  # noqa: E731
    # 500 of 1,000 bytes wanted; 250 free + 100 backed: 150 short, so two sessions' worth
    assert written(_memory_view(10.0, *sessions, free=400)) == []
    assert written(_memory_view(10.0, *sessions, free=250, tier_free=150)) == [(ActionKind.WRITE_BACK, 3)]
    # asked once per IO_WAIT: the next tick asks the others (say the kernel skipped that one)
    assert written(_memory_view(10.0, *sessions, free=250)) == [(ActionKind.WRITE_BACK, 2), (ActionKind.WRITE_BACK, 1)]
    assert written(_memory_view(10.0, *sessions, free=0)) == []
    scheduler.on_phase(attrs.evolve(unknown, phase=Phase.COMPUTE), _memory_view(11.0, free=0))
    scheduler.on_phase(unknown, _memory_view(12.0, free=1000))  # a new IO_WAIT, room to spare
    assert written(_memory_view(12.0, *sessions, free=250)) == [(ActionKind.WRITE_BACK, 3)]
    without = SemanticScheduler(SemanticSettings(write_back=False, idle_threshold_s=0))
    assert without.on_tick(_memory_view(10.0, *sessions, free=0)) == []


def test_a_gpu_with_room_to_spare_writes_nothing_back_and_the_session_resumes_in_place():
    server = serve_with(serving_config(), ["semantic", "tcp"])  # the default headroom
    kernel = server.kernel
    copies = _count_copies(server)
    try:
        with connect(server.url("tcp")) as client, client.model().session() as session:
            first = session.generate(PROMPT, max_new_tokens=2).tokens
            view = server.call(kernel.view)
            assert server.call(lambda: kernel.scheduler.headroom_deficit(view)) < 0  # the premise
            session.signal_phase("IO_WAIT", expected_s=30)
            time.sleep(30 * server.config.server.tick_s)  # the scheduler's ticks see the idle session
            assert _state(server, session.id) == (Residency.RESIDENT, False, None)
            session.signal_phase("COMPUTE")
            assert len(session.generate([first[-1]], max_new_tokens=2).tokens) == 2
            assert copies == {}
            counters = server.call(lambda: dict(kernel.counters))
            assert counters["write_backs"] == counters["evictions"] == counters["restores"] == 0
    finally:
        server.stop()


def test_once_memory_runs_short_the_tick_writes_back_a_session_already_waiting():
    """Room for four sessions of 64 tokens and a headroom of two and a half: the first session
    goes idle with three sessions' room free (no copy), and the tick writes it back once a second
    session leaves only two."""
    _weights, kv = kv_sizes("random:tiny-llama", 64)
    budget_gb = kv_budget_gb("random:tiny-llama", 4, 64)
    headroom = 2.5 * kv / (budget_gb * 2**30)
    server = serve_with(serving_config(budget_gb=budget_gb, settings={"semantic": {"write_back_headroom": headroom}}),
                        ["semantic", "tcp"])
    kernel = server.kernel
    deficit = lambda: server.call(lambda: kernel.scheduler.headroom_deficit(kernel.view()))  # noqa: E731
    try:
        with connect(server.url("tcp")) as client:
            model = client.model()
            first, second = model.session(), model.session()
            first.generate(list(range(1, 60)), max_new_tokens=2)
            assert deficit() < 0  # the premise: room to spare
            first.signal_phase("IO_WAIT", expected_s=30)
            time.sleep(30 * server.config.server.tick_s)
            assert server.call(lambda: kernel.counters["write_backs"]) == 0
            second.generate(list(range(1, 60)), max_new_tokens=2)
            assert wait_for(lambda: server.call(lambda: kernel.counters["write_backs"]) == 1)
            assert _state(server, first.id) == (Residency.RESIDENT, True, "pinned_host")
            assert _state(server, second.id) == (Residency.RESIDENT, False, None)
            assert deficit() <= 0
    finally:
        server.stop()


def test_victims_are_backed_sessions_first_then_waiting_then_least_recently_used():
    scheduler = SemanticScheduler(SemanticSettings(write_back=True))
    lru = _info(1, kv_bytes=100, last_used=1.0)
    waiting = _info(2, kv_bytes=100, phase=Phase.IO_WAIT, expected_resume_at=50.0)
    backed = _info(3, kv_bytes=100, last_used=9.0, backed=True)
    backed_waiting = _info(4, kv_bytes=100, phase=Phase.IO_WAIT, expected_resume_at=20.0, backed=True)
    candidates = [lru, waiting, backed, backed_waiting]
    view = _view(10.0, *candidates)
    assert [s.id for s in scheduler.select_victims(candidates, 100, view)] == [4]
    assert [s.id for s in scheduler.select_victims(candidates, 200, view)] == [4, 3]
    assert [s.id for s in scheduler.select_victims(candidates, 400, view)] == [4, 3, 2, 1]


def test_prefill_order_is_earliest_deadline_first_a_resume_before_a_fresh_arrival():
    scheduler = SemanticScheduler(SemanticSettings(resume_latency_s=0.25, arrival_latency_s=2.0))
    fresh = _info(1, request_at=10.0)
    resume = _info(2, request_at=11.0, resuming=True)
    old_fresh = _info(3, request_at=8.0)  # due at 10.0: before the resume, due at 11.25
    late_resume = _info(4, request_at=12.0, resuming=True)  # due at 12.25: after fresh, due at 12.0
    new_fresh = _info(5, request_at=11.5)  # came before late_resume, due after it (13.5)
    order = scheduler.order_prefill([fresh, resume, old_fresh, new_fresh, late_resume], 12.0)
    assert [s.id for s in order] == [3, 2, 1, 4, 5]


# --------------------------------------------------------------------------- the batch engine


@pytest.fixture(scope="module")
def runner():
    from djinn.engine.models import load_model
    from djinn.engine.runner import ModelRunner

    return ModelRunner(load_model("random:tiny-llama"))


@attrs.define
class _Owner:
    info: SessionInfo


def test_the_engine_prefills_in_the_schedulers_deadline_order(runner):
    scheduler = SemanticScheduler(SemanticSettings(resume_latency_s=0.25, arrival_latency_s=2.0))

    def order(requests):
        ordered = scheduler.order_prefill([r.owner.info for r in requests], 100.0)
        by_id = {r.owner.info.id: r for r in requests}
        return [by_id[info.id] for info in ordered]

    engine = BatchEngine(runner, prefill_chunk_tokens=16, order=order)
    fresh = EngineRequest(runner.new_kv(), list(range(1, 17)), 1, owner=_Owner(_info(1, request_at=99.0)))
    resume = EngineRequest(runner.new_kv(), list(range(1, 17)), 1,
                           owner=_Owner(_info(2, request_at=99.5, resuming=True)))
    for request in (fresh, resume):
        request.kv.ensure_capacity(17)
        engine.submit(request)
    engine.step()  # room for one prompt: the resume, though it came second
    assert resume.prefilled == 16 and fresh.prefilled == 0
    engine.step()
    assert fresh.prefilled == 16


def test_prefill_is_capped_while_decode_rows_wait(runner):
    engine = BatchEngine(runner, prefill_chunk_tokens=64, prefill_tokens_while_decoding=8)
    engine.step_log = []
    decoding = EngineRequest(runner.new_kv(), [1, 2, 3], 20)
    decoding.kv.ensure_capacity(24)
    engine.submit(decoding)
    engine.step()  # alone: its prompt at once, then its first decode row
    long = EngineRequest(runner.new_kv(), list(range(1, 41)), 1)
    long.kv.ensure_capacity(41)
    engine.submit(long)
    while not long.done:
        engine.step()
    steps = engine.step_log[1:]
    assert [s.prefill_tokens for s in steps] == [8, 8, 8, 8, 8]  # 40 tokens, 8 a step beside the decoder
    assert all(s.decode_rows == 1 for s in steps)
    alone = BatchEngine(runner, prefill_chunk_tokens=64, prefill_tokens_while_decoding=8)
    alone.step_log = []
    idle = EngineRequest(runner.new_kv(), list(range(1, 41)), 1)
    idle.kv.ensure_capacity(41)
    alone.submit(idle)
    alone.step()
    assert alone.step_log[0].prefill_tokens == 40  # no decoder waits: the whole chunk budget
    assert BatchEngine(runner, prefill_chunk_tokens=64).prefill_tokens_while_decoding == 64


def test_the_server_setting_reaches_the_engine():
    from djinn.kernel.plugins import get_plugin_manager
    from djinn.server.launch import build_runtime

    config = serving_config(prefill_tokens_while_decoding=32)
    runtime = build_runtime(config, get_plugin_manager(config))
    try:
        assert runtime.model.engine.prefill_tokens_while_decoding == 32
    finally:
        runtime.kernel.stop()


def test_two_requesters_freeing_one_backed_victim_free_it_once():
    """Both wait for the victim's move in flight, then each asks to free it: the first reclaims,
    the second finds it evicted. (Both once started a reclaim and freed its bytes twice.)"""
    import asyncio

    server = serve_with(serving_config(settings=WRITE_BACK), ["semantic", "tcp"])
    kernel = server.kernel
    try:
        with connect(server.url("tcp")) as client, client.model().session() as session:
            session.generate(PROMPT, max_new_tokens=2)
            session.signal_phase("IO_WAIT", expected_s=30)
            assert wait_for(lambda: server.call(lambda: kernel.get(session.id).info.backed))

            async def race():
                record = kernel.get(session.id)
                record.moving = asyncio.ensure_future(asyncio.sleep(0.05))  # a move in flight
                return await asyncio.gather(kernel._evict_now(session.id), kernel._evict_now(session.id))

            freed = asyncio.run_coroutine_threadsafe(race(), server._loop).result(30)
            assert sorted(freed) == [False, True]
            assert server.call(lambda: kernel.memory.device_bytes("kv")) == 0
            assert server.call(lambda: server.model.runner.pool.used_blocks) == 0
            assert server.call(lambda: kernel.counters["reclaims"]) == 1
    finally:
        server.stop()
