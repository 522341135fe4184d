"""``djinn demo``: a server and a few agents over real TCP loopback, in one process.

Each agent runs the loop Djinn is built for: generate -> tool call (IO_WAIT: its KV is written
back, copied to the host tier while its GPU blocks stay) -> resume (COMPUTE) -> generate, and the
demo prints what happened. A server writes back only once memory runs short, which a few agents
never cause, so the demo has semantic write back at every IO_WAIT.
Then one agent speaks the OpenAI API to a model that answers with a tool call: the server puts
its session in IO_WAIT by itself, and the request bringing the tool's result resumes it.
"""

from __future__ import annotations

import json
import random
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import attrs

from djinn.config import DjinnConfig
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


def demo_config(config: DjinnConfig) -> DjinnConfig:
    """``config`` with semantic writing back at every IO_WAIT (``write_back_headroom = 1.0``)."""
    semantic = {**config.settings.get("semantic", {}), "write_back_headroom": 1.0}
    return attrs.evolve(config, settings={**config.settings, "semantic": semantic})


def run_demo(config: DjinnConfig, plugins: DjinnPlugins, *, agents: int, turns: int, echo: Callable[[str], None]) -> None:
    """Serve ``config``'s model and run ``agents`` agents for ``turns`` turns each; print a report."""
    from rich.console import Console
    from rich.table import Table

    echo(f"starting a server for {config.model.name} with plugins: {', '.join(plugins.selection.names())}")
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
        vmu = server.vmu()
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
        f"write-backs: {int(counters['write_backs'])}  evictions: {int(counters['evictions'])}  "
        f"restores: {int(counters['restores'])} "
        f"(on the critical path: {int(counters['restores_on_critical_path'])})  "
        f"device peak: {mem['device_peak_bytes'] / 2**20:.2f} MiB of which weights "
        f"{mem['device']['weights'] / 2**20:.2f} MiB  sessions left open: {vmu['sessions']['total']}"
    )
    run_tool_agent(config, plugins, echo)


def _post(url: str, body: dict[str, Any], session_id: str) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Content-Type": "application/json", "X-Djinn-Session-Id": session_id})
    with urllib.request.urlopen(request, timeout=60) as reply:  # noqa: S310 (the demo's own loopback server)
        return json.load(reply)


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=60) as reply:  # noqa: S310 (the demo's own loopback server)
        return json.load(reply)


def run_tool_agent(config: DjinnConfig, plugins: DjinnPlugins, echo: Callable[[str], None]) -> None:
    """One agent over the OpenAI API: its model calls a tool, which is the phase signal."""
    import attrs

    from djinn.testing.scripted import TOOLS, build_model_dir

    with tempfile.TemporaryDirectory(prefix="djinn-demo-") as home:
        model = build_model_dir(f"{home}/scripted")
        scripted = attrs.evolve(config, model=attrs.evolve(config.model, name=model))
        echo("an agent over the OpenAI API, on a tiny model whose answer is a tool call:")
        with BackgroundServer(scripted, plugins, http_port=0) as server:
            base, session = server.http_url, "demo-agent"
            messages = [{"role": "user", "content": "what is the weather in paris"}]
            answer = _post(f"{base}/chat/completions", {"model": model, "messages": messages, "tools": TOOLS,
                                                         "max_tokens": 20, "temperature": 0}, session)
            choice = answer["choices"][0]
            call = choice["message"]["tool_calls"][0]["function"]
            state = _get(f"{base}/djinn/sessions/{session}")
            echo(f"  finish_reason {choice['finish_reason']!r}: {call['name']}({call['arguments']}); "
                 f"the session is now {state['phase']} ({state['residency']}, {state['tokens']} tokens)")
            messages += [choice["message"], {"role": "tool", "content": "sunny"}]
            again = _post(f"{base}/chat/completions", {"model": model, "messages": messages, "tools": TOOLS,
                                                        "max_tokens": 4, "temperature": 0}, session)
            state = _get(f"{base}/djinn/sessions/{session}")
            cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
            echo(f"  the tool's result resumed it: {state['phase']}, {cached} of "
                 f"{again['usage']['prompt_tokens']} prompt tokens reused from its KV")
