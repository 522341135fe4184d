"""``djinn demo``: a server and a few agents over real TCP loopback, in one process.

Each agent runs the loop Djinn is built for: generate -> tool call (IO_WAIT, its KV leaves the
GPU) -> resume (COMPUTE, its KV comes back) -> generate, and the demo prints what happened.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

from djinn.kernel.config import DjinnConfig
from djinn.kernel.plugins import DjinnPlugins
from djinn.server.launch import BackgroundServer


def _agent(url: str, index: int, turns: int, vocab: int, rows: list[dict[str, Any]], lock: threading.Lock) -> None:
    from djinn.client import connect

    rng = random.Random(index)
    with connect(url) as client, client.model().session() as session:
        prompt = [rng.randrange(vocab) for _ in range(24)]
        for turn in range(turns):
            started = time.perf_counter()
            out = session.generate(prompt, max_new_tokens=8)
            latency = time.perf_counter() - started
            with lock:
                rows.append({"agent": index, "turn": turn, "tokens": out.tokens, "text": out.text,
                             "latency_ms": latency * 1e3, "restore_ms": out.timings.get("restore_s", 0) * 1e3})
            think = rng.uniform(0.05, 0.15)
            session.signal_phase("IO_WAIT", expected_s=think)
            time.sleep(think)  # the "tool call"
            session.signal_phase("COMPUTE")
            prompt = [rng.randrange(vocab) for _ in range(8)]  # the tool's result


def run_demo(config: DjinnConfig, plugins: DjinnPlugins, *, agents: int, turns: int, echo: Callable[[str], None]) -> None:
    """Serve ``config``'s model and run ``agents`` agents for ``turns`` turns each; print a report."""
    from rich.console import Console
    from rich.table import Table

    echo(f"starting a server for {config.model.name} with plugins: {', '.join(plugins.selected_names())}")
    with BackgroundServer(config, plugins) as server:
        url = server.url("tcp")
        echo(f"listening on {url}; {agents} agents x {turns} turns")
        vocab = server.model.runner.vocab_size
        rows: list[dict[str, Any]] = []
        lock = threading.Lock()
        threads = [threading.Thread(target=_agent, args=(url, i, turns, vocab, rows, lock)) for i in range(agents)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        vmu = server.call(server.kernel.vmu)
    table = Table(title="djinn demo: agent turns")
    for col in ("agent", "turn", "latency ms", "restore ms", "new tokens"):
        table.add_column(col)
    for r in sorted(rows, key=lambda r: (r["agent"], r["turn"])):
        shown = repr(r["text"]) if r["text"] is not None else " ".join(map(str, r["tokens"]))
        table.add_row(str(r["agent"]), str(r["turn"]), f"{r['latency_ms']:.1f}", f"{r['restore_ms']:.2f}", shown)
    console = Console()
    console.print(table)
    counters = vmu["counters"]
    mem = vmu["memory"]
    console.print(
        f"evictions: {int(counters['evictions'])}  restores: {int(counters['restores'])} "
        f"(on the critical path: {int(counters['restores_on_critical_path'])})  "
        f"device peak: {mem['device_peak_bytes'] / 2**20:.2f} MiB of which weights "
        f"{mem['device']['weights'] / 2**20:.2f} MiB  sessions left open: {vmu['sessions']['total']}"
    )
