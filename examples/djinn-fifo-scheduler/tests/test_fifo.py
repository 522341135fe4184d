"""The fifo scheduler keeps the scheduler contract (run with the plugin installed)."""

from djinn.testing import SchedulerContract


class TestFifo(SchedulerContract):
    plugin = "fifo"
