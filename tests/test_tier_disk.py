"""The ``disk`` tier: a memory-mapped file created at start and removed at stop; demotion of the
coldest evicted session from the host tier to disk when the host tier is full, and the restore
from disk, both bitwise exact."""

from __future__ import annotations

import asyncio
import os

import attrs
import pytest
import torch

from djinn.client import connect
from djinn.kernel.errors import TierFullError
from djinn.kernel.strategies import Residency
from djinn.plugins.tiers.disk import DiskSettings, DiskTier
from eval.reliability.run import books, kv_budget_gb, kv_sizes
from tests.serving import serving_config
from tests.test_kernel import _local_turns, serve_with, wait_for


def test_the_file_exists_from_start_to_stop_and_holds_what_is_written(tmp_path):
    path = tmp_path / "kv.bin"
    tier = DiskTier(DiskSettings(path=str(path), capacity_gb=1 / 1024))
    assert not path.exists()
    tier.start(False)
    assert path.stat().st_size == 1 << 20
    block = tier.allocate(5000)
    tier.view(block).copy_(torch.arange(5000).remainder(256).to(torch.uint8))
    tier.view(block)[:1]  # a second view sees the same bytes
    assert torch.equal(tier.view(block), torch.arange(5000).remainder(256).to(torch.uint8))
    with pytest.raises(TierFullError):
        tier.allocate(1 << 20)
    with pytest.raises(FileExistsError):  # never clobbers a file that is there
        DiskTier(DiskSettings(path=str(path), capacity_gb=1 / 1024)).start(False)
    tier.stop()
    assert not path.exists()


def test_without_a_path_it_makes_a_temporary_file():
    tier = DiskTier(DiskSettings(capacity_gb=1 / 1024))
    tier.start(False)
    path = tier.path
    assert path and os.path.exists(path)
    tier.stop()
    assert not os.path.exists(path)


def _tier_bytes(server, session_id):
    """A copy of the session's tier block, with the tier's name."""
    def read():
        s = server.kernel.get(session_id)
        return s.tier, server.kernel.tiers[s.tier].view(s.block).clone()
    return server.call(read)


def _device_kv(server, session_id) -> torch.Tensor:
    """The session's resident KV, copied out by the engine (``[L, 2, capacity, H_kv, D]`` as bytes)."""
    async def copy():
        kv = server.kernel.get(session_id).kv
        host = torch.empty(kv.nbytes, dtype=torch.uint8)
        await server.model.copy_out(kv, host)
        return host
    return asyncio.run_coroutine_threadsafe(copy(), server._loop).result(30)


def _one_session_each_on_gpu_and_host(tmp_path, write_back: bool = False, **plugins):
    """A semantic server (evicting at IO_WAIT, or writing back) with GPU room for one session, a
    host tier of one session and a disk tier of four below it; ``plugins``: local plugins to select."""
    _weights, kv = kv_sizes("random:tiny-llama", 64)
    config = serving_config(
        budget_gb=kv_budget_gb("random:tiny-llama", 1, 64), tier_gb=kv / 2**30,
        settings={"disk": {"path": str(tmp_path / "kv.bin"), "capacity_gb": 4 * kv / 2**30},
                  "semantic": {"write_back": write_back}},
    )
    return serve_with(config, ["semantic", "disk", "tcp"], **plugins)


def _as_if_pinned(server):
    """Make the host tier report itself pinned and the engine copy with CUDA (what decides, with
    the tiers' stats, where the device copies): the device then copies only to that tier."""
    pinned = server.kernel.tiers["pinned_host"]
    stats = pinned.stats
    pinned.stats = lambda: attrs.evolve(stats(), pinned=True)
    server.kernel.backend.pinned_host = True
    assert server.call(server.kernel._device_tiers) == ["pinned_host"]
    return pinned


def test_a_write_back_takes_only_free_room_and_never_demotes(tmp_path):
    """A write-back is speculative: as on a GPU (the device copies only to the pinned tier), with
    that tier full of an evicted session's copy it is skipped, and the evicted copy stays where it
    is (no demotion to disk), without the placement being asked for demotions."""
    server = _one_session_each_on_gpu_and_host(tmp_path, write_back=True)
    kernel = server.kernel
    _as_if_pinned(server)
    asked = []
    choose = kernel.placement.select_demotions
    kernel.placement.select_demotions = lambda *args: asked.append(args) or choose(*args)
    try:
        with connect(server.url("tcp")) as client:
            model = client.model()
            cold, warm = model.session(), model.session()
            cold.generate([11, 12, 13], max_new_tokens=8)
            cold.signal_phase("IO_WAIT", expected_s=600)  # back later than warm: colder, a copy to demote
            assert wait_for(lambda: server.call(lambda: kernel.get(cold.id).info.backed))
            warm.generate([1, 2, 3], max_new_tokens=8)  # no GPU room: cold's blocks are reclaimed
            assert server.call(lambda: (kernel.get(cold.id).info.residency, kernel.get(cold.id).tier)) == (
                Residency.EVICTED, "pinned_host")
            warm.signal_phase("IO_WAIT", expected_s=60)
            assert wait_for(lambda: server.call(lambda: kernel.counters["write_back_skips"]) == 1)
            assert server.call(lambda: kernel.get(cold.id).tier) == "pinned_host"
            assert server.call(lambda: (kernel.get(warm.id).info.residency, kernel.get(warm.id).info.backed)) == (
                Residency.RESIDENT, False)
            counters = server.call(lambda: dict(kernel.counters))
            assert counters["demotions"] == 0 and counters["write_backs"] == 1 and counters["reclaims"] == 1
            assert server.call(lambda: kernel.tiers["disk"].stats().allocations) == 0
            assert asked == []
            cold.close()
            warm.close()
        assert wait_for(lambda: books(server)["sessions"] == 0)
        assert books(server) == {k: 0 for k in books(server)}
    finally:
        server.stop()


def test_a_full_host_tier_demotes_the_coldest_session_to_disk_and_it_comes_back_bitwise(tmp_path):
    """GPU room for one session, host tier room for one: the second eviction demotes the first
    (expected back later) to disk; its bytes on disk are the bytes it left the GPU with, and
    its restore from disk brings back the same KV and the same next tokens."""
    server = _one_session_each_on_gpu_and_host(tmp_path)
    kernel = server.kernel
    assert list(kernel.tiers) == ["pinned_host", "disk"]
    turns = [[11, 12, 13, 14, 15], [21, 22]]
    expected = _local_turns(server, turns, 8)
    try:
        with connect(server.url("tcp")) as client:
            model = client.model()
            cold, warm = model.session(), model.session()
            got = [cold.generate(turns[0], max_new_tokens=8).tokens]
            on_gpu = _device_kv(server, cold.id)
            cold.signal_phase("IO_WAIT", expected_s=60)
            assert wait_for(lambda: server.call(lambda: kernel.get(cold.id).info.residency) is Residency.EVICTED)
            tier, in_host = _tier_bytes(server, cold.id)
            assert tier == "pinned_host" and torch.equal(in_host[: on_gpu.numel()], on_gpu)
            warm.generate([1, 2, 3], max_new_tokens=8)
            warm.signal_phase("IO_WAIT", expected_s=1)
            assert wait_for(lambda: server.call(lambda: kernel.get(warm.id).info.residency) is Residency.EVICTED)
            tier, on_disk = _tier_bytes(server, cold.id)
            assert tier == "disk" and torch.equal(on_disk, in_host)  # demoted bitwise
            assert server.call(lambda: kernel.get(warm.id).tier) == "pinned_host"
            counters = server.call(lambda: dict(kernel.counters))
            assert counters["demotions"] == 1 and counters["evict_failures"] == 0
            snapshot = server.call(lambda: kernel.memory.snapshot())
            assert snapshot["tiers"] == {"pinned_host": in_host.numel(), "disk": in_host.numel()}
            cold.signal_phase("COMPUTE")
            assert wait_for(lambda: server.call(lambda: kernel.get(cold.id).info.residency) is Residency.RESIDENT)
            assert torch.equal(_device_kv(server, cold.id), on_gpu)  # restored from disk bitwise
            assert server.call(lambda: kernel.tiers["disk"].stats().allocations) == 0
            got.append(cold.generate(turns[1], max_new_tokens=8).tokens)
            assert got == expected
            cold.close()
            warm.close()
        assert wait_for(lambda: books(server)["sessions"] == 0)
        assert books(server) == {k: 0 for k in books(server)}
    finally:
        server.stop()
    assert not (tmp_path / "kv.bin").exists()


def test_with_cuda_copies_the_device_reads_and_writes_only_pinned_tiers(tmp_path):
    """As on a GPU (the engine copies with CUDA, the host tier is pinned): an eviction is never
    copied from the device into the disk tier's pageable mapping, and a restore first brings a
    disk copy back into the pinned tier when it has room (a promotion), then copies from there."""
    server = _one_session_each_on_gpu_and_host(tmp_path)
    kernel = server.kernel
    pinned = _as_if_pinned(server)
    try:
        with connect(server.url("tcp")) as client:
            model = client.model()
            cold, warm = model.session(), model.session()
            cold.generate([11, 12, 13], max_new_tokens=8)
            on_gpu = _device_kv(server, cold.id)
            cold.signal_phase("IO_WAIT", expected_s=60)
            assert wait_for(lambda: server.call(lambda: kernel.get(cold.id).info.residency) is Residency.EVICTED)
            warm.generate([1, 2, 3], max_new_tokens=8)
            warm.signal_phase("IO_WAIT", expected_s=1)
            assert wait_for(lambda: server.call(lambda: kernel.get(warm.id).info.residency) is Residency.EVICTED)
            assert server.call(lambda: (kernel.get(cold.id).tier, kernel.get(warm.id).tier)) == ("disk", "pinned_host")
            warm.close()  # the pinned tier has room again
            assert wait_for(lambda: server.call(lambda: pinned.stats().allocations) == 0)
            cold.signal_phase("COMPUTE")
            assert wait_for(lambda: server.call(lambda: kernel.get(cold.id).info.residency) is Residency.RESIDENT)
            assert torch.equal(_device_kv(server, cold.id), on_gpu)
            counters = server.call(lambda: dict(kernel.counters))
            assert counters["demotions"] == 1 and counters["promotions"] == 1
            assert server.call(lambda: kernel.tiers["disk"].stats().allocations) == 0
    finally:
        server.stop()
