"""Contract suites for plugin authors: pytest classes that check a strategy against what its
slot's contract promises (``djinn.kernel.strategies`` for schedulers, tiers and placements,
``djinn.wire.contracts`` for transports, ``djinn.engine.streaming`` for streamers). Subclass one
and name the entry point:

    from djinn.testing import SchedulerContract

    class TestFifo(SchedulerContract):
        plugin = "fifo"

Each test builds the strategy through a fresh plugin manager, exactly as the kernel would, so
the plugin must be installed (its entry point visible). Importing this package needs neither
CUDA nor, until a tier or streamer test runs, torch.
"""

from djinn.testing._plugins import build_strategy
from djinn.testing.placement import PlacementContract
from djinn.testing.scheduler import SchedulerContract
from djinn.testing.streamer import StreamerContract
from djinn.testing.tier import TierContract
from djinn.testing.transport import TransportContract

__all__ = ["PlacementContract", "SchedulerContract", "StreamerContract", "TierContract", "TransportContract", "build_strategy"]
