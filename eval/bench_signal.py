"""How fast a phase signal is handled: client call, arrival at the scheduler, and the move it starts.

    python -m eval.bench_signal --model random:llama-7b --dtype bfloat16 --context 1024 \\
        --out eval/results/signal_<tag>.json

One server in this process (semantic scheduler evicting at IO_WAIT, no write-back; pinned_host
tier; tcp), one client session holding
``--context`` tokens of KV. Each round: ``signal_phase("IO_WAIT")``, wait until the KV is evicted,
``signal_phase("COMPUTE")``, wait until it is restored. Times, all on this process's clock:

- ``call``: how long the client's ``signal_phase`` takes to return (it sends and does not wait);
- ``handled``: from the client's call to the server's ``djinn_phase_changed`` hook, i.e. wire,
  dispatch and the scheduler's decision;
- ``moved``: from the client's call to the end of the eviction (``IO_WAIT``) or of the restore
  (``COMPUTE``) that the signal started, from the ``djinn_session_evicted``/``restored`` hooks.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import attrs
import click

from djinn.client import connect
from djinn.config import DjinnConfig
from djinn.kernel.hookspecs import hookimpl
from djinn.kernel.plugins import get_plugin_manager
from djinn.server.launch import BackgroundServer
from eval.report import result_header


class SignalClock:
    """A hooks-only plugin that timestamps phase changes, evictions and restores."""

    def __init__(self) -> None:
        self.events: dict[str, list[float]] = {"phase": [], "evicted": [], "restored": []}
        self.changed = threading.Condition()

    def _record(self, kind: str) -> None:
        with self.changed:
            self.events[kind].append(time.perf_counter())
            self.changed.notify_all()

    def wait(self, kind: str, count: int, timeout: float = 30.0) -> float:
        """The time of the ``count``-th event of ``kind`` (waiting for it)."""
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.events[kind]) >= count, timeout):
                raise TimeoutError(f"no {kind} event #{count} within {timeout} s")
            return self.events[kind][count - 1]

    @hookimpl
    def djinn_phase_changed(self, session, old, new) -> None:
        self._record("phase")

    @hookimpl
    def djinn_session_evicted(self, session, tier, nbytes, seconds) -> None:
        self._record("evicted")

    @hookimpl
    def djinn_session_restored(self, session, tier, nbytes, seconds, on_critical_path) -> None:
        self._record("restored")


def _ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50": statistics.median(ordered) * 1e3,
        "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3,
        "max": ordered[-1] * 1e3,
    }


@click.command()
@click.option("--model", "model_name", default="random:tiny-llama")
@click.option("--dtype", default="float32")
@click.option("--context", default=256, help="tokens of KV the session holds")
@click.option("--rounds", default=200)
@click.option("--tier-gb", default=2.0)
@click.option("--out", type=click.Path(path_type=Path), required=True)
def main(model_name: str, dtype: str, context: int, rounds: int, tier_gb: float, out: Path) -> None:
    """Measure ``rounds`` IO_WAIT/COMPUTE round trips; write one JSON result file."""
    base = DjinnConfig()
    config = attrs.evolve(
        base,
        server=attrs.evolve(base.server, port=0, metrics_port=0, tick_s=0.01),
        model=attrs.evolve(base.model, name=model_name, dtype=dtype),
        settings={"pinned_host": {"capacity_gb": tier_gb}, "semantic": {"write_back": False}},
    )
    clock = SignalClock()
    plugins = get_plugin_manager(config, ["semantic", "tcp", "clock"], extra_plugins={"clock": clock})
    server = BackgroundServer(config, plugins).start()
    samples: dict[str, list[float]] = {k: [] for k in
                                       ("io_wait_call", "io_wait_handled", "evicted", "compute_call",
                                        "compute_handled", "restored")}
    try:
        with connect(server.url("tcp")) as client:
            session = client.model().session()
            vocab = server.model.runner.vocab_size
            session.generate([i % vocab for i in range(context)], max_new_tokens=1)
            kv_bytes = server.call(lambda: server.kernel.get(session.id).kv.nbytes)
            for i in range(1, rounds + 1):
                for phase, call, handled, moved, event in (
                    ("IO_WAIT", "io_wait_call", "io_wait_handled", "evicted", "evicted"),
                    ("COMPUTE", "compute_call", "compute_handled", "restored", "restored"),
                ):
                    phases_before = len(clock.events["phase"])
                    started = time.perf_counter()
                    session.signal_phase(phase)
                    samples[call].append(time.perf_counter() - started)
                    samples[handled].append(clock.wait("phase", phases_before + 1) - started)
                    samples[moved].append(clock.wait(event, i) - started)
    finally:
        server.stop()
    report: dict[str, Any] = {
        **result_header(
            "signal", "eval.bench_signal",
            f"random weights of the named shape; one server and client in one process over tcp "
            f"loopback; device {server.model.device}",
            dict(model=model_name, dtype=dtype, context=context, rounds=rounds, kv_bytes=kv_bytes),
        ),
        "raw_s": samples,
        "summary_ms": {key: _ms(values) for key, values in samples.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    for key, value in report["summary_ms"].items():
        click.echo(f"{key:>16}: p50 {value['p50']:8.3f} ms  p99 {value['p99']:8.3f} ms  max {value['max']:8.3f} ms")


if __name__ == "__main__":
    main()
