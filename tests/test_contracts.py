"""Every built-in plugin passes the contract suite of its slot (``djinn.testing``)."""

from __future__ import annotations

import pytest

from djinn.kernel.errors import PluginError
from djinn.plugins.transports import ucx
from djinn.testing import SchedulerContract, StreamerContract, TierContract, TransportContract


def _ucx_missing() -> str | None:
    try:
        ucx.import_ucxx()
    except PluginError as exc:
        return str(exc)
    return None


UCX_MISSING = _ucx_missing()


class TestSemantic(SchedulerContract):
    plugin = "semantic"
    settings = {"idle_threshold_s": 1.0}  # so the long-idle tick evicts


class TestLru(SchedulerContract):
    plugin = "lru"


class TestRecompute(SchedulerContract):
    plugin = "recompute"


class TestStatic(SchedulerContract):
    plugin = "static"


class TestPinnedHost(TierContract):
    plugin = "pinned_host"
    settings = {"capacity_gb": 1 / 1024}  # 1 MiB


class TestResident(StreamerContract):
    plugin = "resident"


class TestRingbuffer(StreamerContract):
    plugin = "ringbuffer"


class TestRingbufferInChunks(StreamerContract):
    plugin = "ringbuffer"
    settings = {"chunk_mb": 1 / 1024, "prefetch_layers": 1}  # 1 KiB copies, one layer ahead


class TestTcp(TransportContract):
    plugin = "tcp"


class TestInproc(TransportContract):
    plugin = "inproc"


@pytest.mark.skipif(UCX_MISSING is not None, reason=UCX_MISSING or "")
class TestUcx(TransportContract):
    plugin = "ucx"
