"""Experiment 3: white-box interactivity over a real server on TCP loopback.

    python -m eval.exp3_interactivity.run --out eval/results/exp3_<tag>.json
    python -m eval.exp3_interactivity.run --smoke --out /tmp/exp3_smoke.json   # tiny models, CPU

(a) robustness: random sequences through ``random:mistral-7b`` (bf16 on CUDA) with breakpoints at
    layers 8, 16, 24 and unmodified resume: token accuracy against the same request without
    breakpoints; the client round trip of ``resume()`` beside a PING round trip (the dispatch
    floor) and beside the time a non-resident design would spend moving the session's KV over
    PCIe (KV bytes / 54.9e9 B/s). The round trips are measured twice: from a client in this
    process (sharing the interpreter with the server) and from one in a process of its own, which
    also times a PING at each hit (at once, and 20 ms into the pause) and PINGs each sent after
    20 ms idle, to tell what a resume costs from what any frame costs at that moment.
(b) steering: ``random:gpt2``, pause at layer 6, ``scale(0.9)``, resume: did the output change,
    the share of diverging tokens, and the cost of scale + resume against a plain resume (from
    both clients).
(c) isolation: a second connection's generate latency while no session is paused and while
    another session sits paused at a breakpoint.
(d) no-breakpoint overhead: the same model's greedy generate in process (the runner alone)
    against a generate over the server (client wall time and the server's own prefill + decode).

One server per model, in turn. Writes JSON (hardware, versions, configuration, raw samples,
summary), a PNG next to it, and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

from djinn.client import Client, connect
from djinn.config import DjinnConfig
from djinn.kernel.errors import DjinnError
from djinn.kernel.plugins import get_plugin_manager
from djinn.engine.runner import greedy_generate
from djinn.server.launch import BackgroundServer
from djinn.wire.frames import Op
from eval.bench_transport import hardware
from eval.exp1_density.run import percentile
from eval.report import library_versions, source_commit

#: pinned host-to-device bandwidth (B/s) measured on the H100 machine: the cost of a KV round
#: trip that a design without server-resident KV would pay at every breakpoint
PCIE_BYTES_PER_S = 54.9e9
#: the client's idle time before each PING of the idle floor, and at a hit before its held PING:
#: about what a pass takes to reach the next hit, so the threads and cores have gone idle
IDLE_GAP_S = 0.02


@attrs.frozen
class Exp3Config:
    """What one run measures and on which models."""

    robust_model: str = "random:mistral-7b"
    robust_layers: tuple[int, ...] = (8, 16, 24)
    steer_model: str = "random:gpt2"
    steer_layer: int = 6
    steer_factor: float = 0.9
    sequences: int = 10
    prompt_tokens: int = 128
    new_tokens: int = 32
    ping_samples: int = 200
    isolation_samples: int = 10
    dtype: str = "bfloat16"
    seed: int = 0
    #: serve in deterministic mode (``[server] deterministic``)
    deterministic: bool = False

    @classmethod
    def smoke(cls) -> Exp3Config:
        """Tiny models and short sequences: runs in seconds on a CPU."""
        return cls(robust_model="random:tiny-mistral", robust_layers=(1, 2, 3), steer_model="random:tiny-gpt2",
                   steer_layer=2, sequences=3, prompt_tokens=16, new_tokens=8, ping_samples=50,
                   isolation_samples=5, dtype="float32")


def djinn_config(model: str, dtype: str, deterministic: bool = False) -> DjinnConfig:
    """Defaults with free ports, no metrics endpoint, and the given model and mode."""
    base = DjinnConfig()
    if not torch.cuda.is_available():
        dtype = "float32"
    return attrs.evolve(
        base,
        server=attrs.evolve(base.server, port=0, metrics_port=0, http_port=0, deterministic=deterministic),
        model=attrs.evolve(base.model, name=model, dtype=dtype),
    )


def model_server(model: str, dtype: str, deterministic: bool = False) -> BackgroundServer:
    """A server for one model with the default plugin selection (starts on ``with``)."""
    config = djinn_config(model, dtype, deterministic)
    return BackgroundServer(config, get_plugin_manager(config))


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """``count`` random token sequences, reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=generator).tolist() for _ in range(count)]


def summary_of(samples: list[float]) -> dict[str, Any]:
    """p50, p99, mean and count of seconds, reported in milliseconds."""
    if not samples:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "mean_ms": None}
    return {"n": len(samples), "p50_ms": percentile(samples, 50) * 1e3, "p99_ms": percentile(samples, 99) * 1e3,
            "mean_ms": statistics.fmean(samples) * 1e3}


def agreement(a: list[int], b: list[int]) -> float:
    """Share of positions where two token lists agree (over the longer length)."""
    n = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / n if n else 1.0


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn()`` takes."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def ping(client: Client) -> None:
    """One PING round trip."""
    client._loop.run(client._async.request(Op.PING))


def ping_round_trips(client: Client, count: int, idle_s: float = 0.0) -> list[float]:
    """Client round trips of PING: the server's dispatch floor over this transport; with
    ``idle_s``, each after the client has been idle that long (the floor a frame meets after a wait)."""
    samples = []
    for _ in range(count):
        time.sleep(idle_s)
        samples.append(timed(lambda: ping(client)))
    return samples


def traced_run(client: Client, prompt: list[int], new_tokens: int, layers: tuple[int, ...],
               edit: Callable[[Any], None] | None, server: BackgroundServer | None = None,
               ping_while_paused: bool = False, hold_s: float = 0.0) -> dict[str, Any]:
    """Generate with breakpoints; time each hit's (edit +) resume; with ``server`` (in this
    process), read the session's KV bytes while paused; with ``ping_while_paused``, time a PING
    at each hit before its resume (``paused_ping_s``): any frame's round trip in that moment,
    sent ``hold_s`` after the hit arrived."""
    session = client.model().session()
    resume_s: list[float] = []
    paused_ping_s: list[float] = []
    kv_bytes = 0
    trace = session.trace(prompt, new_tokens, breakpoints=layers)
    for hit in trace:
        if not kv_bytes and server is not None:
            kv_bytes = server.call(lambda: server.kernel.get(session.id).info.kv_bytes)

        def act(hit=hit) -> None:
            if edit is not None:
                edit(hit)
            hit.resume()

        if ping_while_paused:
            time.sleep(hold_s)
            paused_ping_s.append(timed(lambda: ping(client)))
        resume_s.append(timed(act))
    tokens = trace.result.tokens
    session.close()
    return {"tokens": tokens, "resume_s": resume_s, "kv_bytes": kv_bytes, "paused_ping_s": paused_ping_s}


def _rounds_in_this_process(url: str, prompts: list[list[int]], new_tokens: int, layers: tuple[int, ...],
                            factor: float | None, ping_samples: int) -> dict[str, Any]:
    with connect(url) as client:
        runs = [traced_run(client, prompt, new_tokens, layers, None) for prompt in prompts]
        steered = [traced_run(client, prompt, new_tokens, layers, lambda hit: hit.scale(factor))
                   for prompt in prompts] if factor is not None else []
        probed = [traced_run(client, prompt, new_tokens, layers, None, ping_while_paused=True)
                  for prompt in prompts] if factor is None else []
        held = [traced_run(client, prompt, new_tokens, layers, None, ping_while_paused=True, hold_s=IDLE_GAP_S)
                for prompt in prompts] if factor is None else []
        return {"tokens": [r["tokens"] for r in runs], "resume_s": [t for r in runs for t in r["resume_s"]],
                "scale_resume_s": [t for r in steered for t in r["resume_s"]],
                "paused_ping_s": [t for r in probed for t in r["paused_ping_s"]],
                "resume_after_ping_s": [t for r in probed for t in r["resume_s"]],
                "held_paused_ping_s": [t for r in held for t in r["paused_ping_s"]],
                "ping_s": ping_round_trips(client, ping_samples),
                "idle_ping_s": ping_round_trips(client, ping_samples, IDLE_GAP_S) if factor is None else []}


def client_process_rounds(url: str, prompts: list[list[int]], new_tokens: int, layers: tuple[int, ...],
                          factor: float | None, ping_samples: int) -> dict[str, Any]:
    """The traces' resume (and, with ``factor``, scale + resume) round trips and PINGs from a client
    in a process of its own, as a user's client is: an in-process client shares the server's
    interpreter lock with the model thread, which starts computing as soon as a resume is answered.
    Without ``factor`` the traces also run twice more with a PING at each hit before its resume,
    sent at once and ``IDLE_GAP_S`` after the hit, and PINGs are also timed each after an idle
    gap of ``IDLE_GAP_S``: they tell a resume's own cost from that of any frame arriving while a
    pass is paused, and that moment's cost from the cost of any frame after the client waited."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_rounds_in_this_process, (url, prompts, new_tokens, layers, factor, ping_samples))


def plain_run(client: Client, prompt: list[int], new_tokens: int) -> dict[str, Any]:
    """Generate with no breakpoint on a fresh session; client wall time and the server's timings."""
    session = client.model().session()
    started = time.perf_counter()
    result = session.generate(prompt, new_tokens)
    wall = time.perf_counter() - started
    session.close()
    return {"tokens": result.tokens, "wall_s": wall, "timings": result.timings}


# --------------------------------------------------------------------------- parts


def robustness(server: BackgroundServer, client: Client, cfg: Exp3Config, prompts: list[list[int]]) -> dict[str, Any]:
    """(a) unmodified resume: token accuracy, resume latency, PING floor, KV residency argument."""
    runs = []
    for prompt in prompts:
        plain = plain_run(client, prompt, cfg.new_tokens)
        traced = traced_run(client, prompt, cfg.new_tokens, cfg.robust_layers, None, server)
        runs.append({"plain_tokens": plain["tokens"], **traced,
                     "accuracy": agreement(plain["tokens"], traced["tokens"])})
    resume = [s for r in runs for s in r["resume_s"]]
    ping = ping_round_trips(client, cfg.ping_samples)
    kv = max(r["kv_bytes"] for r in runs)
    apart = client_process_rounds(server.url("tcp"), prompts, cfg.new_tokens, cfg.robust_layers, None, cfg.ping_samples)
    return {
        "runs": runs, "ping_s": ping, "client_process": apart,
        "summary": {
            "token_accuracy": statistics.fmean(r["accuracy"] for r in runs),
            "exact_sequences": sum(r["accuracy"] == 1.0 for r in runs), "sequences": len(runs),
            "resume": summary_of(resume), "ping": summary_of(ping),
            "client_process_exact_sequences": sum(t == r["plain_tokens"] for t, r in zip(apart["tokens"], runs)),
            "client_process_resume": summary_of(apart["resume_s"]), "client_process_ping": summary_of(apart["ping_s"]),
            "client_process_paused_ping": summary_of(apart["paused_ping_s"]),
            "client_process_resume_after_ping": summary_of(apart["resume_after_ping_s"]),
            "client_process_held_paused_ping": summary_of(apart["held_paused_ping_s"]),
            "client_process_idle_ping": summary_of(apart["idle_ping_s"]),
            "session_kv_bytes": kv, "kv_over_pcie_ms": kv / PCIE_BYTES_PER_S * 1e3,
        },
    }


def isolation(server: BackgroundServer, cfg: Exp3Config, prompt: list[int]) -> dict[str, Any]:
    """(c) a second connection's generate latency with no pause and with another session paused."""
    url = server.url("tcp")
    with connect(url) as pausing, connect(url) as other:

        def other_generate() -> float:
            return plain_run(other, prompt, cfg.new_tokens)["wall_s"]

        other_generate()  # warm-up
        unpaused = [other_generate() for _ in range(cfg.isolation_samples)]
        trace = pausing.model().session().trace(prompt, cfg.new_tokens, breakpoints=cfg.robust_layers[:1])
        next(trace)
        paused = [other_generate() for _ in range(cfg.isolation_samples)]
        for _ in trace:
            pass
    return {"unpaused_s": unpaused, "paused_s": paused,
            "summary": {"unpaused": summary_of(unpaused), "paused": summary_of(paused)}}


def hot_path_overhead(server: BackgroundServer, client: Client, cfg: Exp3Config, prompts: list[list[int]]) -> dict[str, Any]:
    """(d) the runner alone (in process, same model object) against a generate over the server."""
    runner = server.model.runner
    local, served_wall, served_compute = [], [], []
    for prompt in prompts:
        # the server is idle here, so the runner's model is free to use from this thread
        ids = runner.ids_tensor(prompt)
        greedy_generate(runner, runner.new_kv(), ids, 2)  # warm-up
        local.append(timed(lambda: (greedy_generate(runner, runner.new_kv(), ids, cfg.new_tokens), _sync())))
        plain = plain_run(client, prompt, cfg.new_tokens)
        served_wall.append(plain["wall_s"])
        served_compute.append(plain["timings"]["prefill_s"] + plain["timings"]["decode_s"])
    local_p50 = percentile(local, 50)
    return {
        "local_s": local, "served_wall_s": served_wall, "served_compute_s": served_compute,
        "summary": {
            "local": summary_of(local), "served_wall": summary_of(served_wall),
            "served_compute": summary_of(served_compute),
            "server_compute_over_local": percentile(served_compute, 50) / local_p50,
            "client_wall_over_local": percentile(served_wall, 50) / local_p50,
        },
    }


def steering(server: BackgroundServer, client: Client, cfg: Exp3Config, prompts: list[list[int]]) -> dict[str, Any]:
    """(b) scale at one layer: output changed, token divergence, scale + resume against resume."""
    layers = (cfg.steer_layer,)
    runs = []
    for prompt in prompts:
        plain = plain_run(client, prompt, cfg.new_tokens)
        unmodified = traced_run(client, prompt, cfg.new_tokens, layers, None, server)
        steered = traced_run(client, prompt, cfg.new_tokens, layers, lambda hit: hit.scale(cfg.steer_factor), server)
        runs.append({"plain_tokens": plain["tokens"], "steered_tokens": steered["tokens"],
                     "resume_s": unmodified["resume_s"], "scale_resume_s": steered["resume_s"],
                     "divergence": 1.0 - agreement(plain["tokens"], steered["tokens"])})
    resume = [s for r in runs for s in r["resume_s"]]
    scale_resume = [s for r in runs for s in r["scale_resume_s"]]
    apart = client_process_rounds(server.url("tcp"), prompts, cfg.new_tokens, layers, cfg.steer_factor, 0)
    return {
        "runs": runs, "client_process": apart,
        "summary": {
            "changed_sequences": sum(r["divergence"] > 0 for r in runs), "sequences": len(runs),
            "token_divergence_pct": 100 * statistics.fmean(r["divergence"] for r in runs),
            "resume": summary_of(resume), "scale_resume": summary_of(scale_resume),
            "steering_overhead_ms": percentile(scale_resume, 50) * 1e3 - percentile(resume, 50) * 1e3,
            "client_process_resume": summary_of(apart["resume_s"]),
            "client_process_scale_resume": summary_of(apart["scale_resume_s"]),
            "client_process_steering_overhead_ms":
                percentile(apart["scale_resume_s"], 50) * 1e3 - percentile(apart["resume_s"], 50) * 1e3,
        },
    }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def guarded(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one part; a DjinnError is recorded in the report instead of ending the run."""
    try:
        return fn()
    except DjinnError as exc:
        print(f"part {name} failed: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"}


def measure(cfg: Exp3Config) -> dict[str, Any]:
    """Every part: one server for the robustness model, then one for the steering model."""
    parts: dict[str, Any] = {}
    with model_server(cfg.robust_model, cfg.dtype, cfg.deterministic) as server, connect(server.url("tcp")) as client:
        prompts = random_prompts(cfg.sequences, cfg.prompt_tokens, client.info["vocab_size"], cfg.seed)
        parts["model_info"] = {"robust": dict(client.info)}
        parts["robustness"] = guarded("robustness", lambda: robustness(server, client, cfg, prompts))
        parts["isolation"] = guarded("isolation", lambda: isolation(server, cfg, prompts[0]))
        parts["hot_path"] = guarded("hot_path", lambda: hot_path_overhead(server, client, cfg, prompts))
    with model_server(cfg.steer_model, cfg.dtype, cfg.deterministic) as server, connect(server.url("tcp")) as client:
        prompts = random_prompts(cfg.sequences, cfg.prompt_tokens, client.info["vocab_size"], cfg.seed + 1)
        parts["model_info"]["steer"] = dict(client.info)
        parts["steering"] = guarded("steering", lambda: steering(server, client, cfg, prompts))
    return parts


# --------------------------------------------------------------------------- report


def plot(report: dict[str, Any], path: Path) -> None:
    """Bars: resume vs PING vs KV over PCIe; steering cost; the second session's latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    rob = report["robustness"].get("summary")
    if rob:
        names = ["resume p50", "resume p99", "PING p50", "KV over PCIe"]
        values = [rob["resume"]["p50_ms"], rob["resume"]["p99_ms"], rob["ping"]["p50_ms"], rob["kv_over_pcie_ms"]]
        axes[0].bar(names, values, color=["C0", "C0", "C7", "C3"])
        axes[0].set_title(f"(a) {report['config']['robust_model']}: resume")
    steer = report["steering"].get("summary")
    if steer:
        axes[1].bar(["resume p50", "scale+resume p50"], [steer["resume"]["p50_ms"], steer["scale_resume"]["p50_ms"]])
        axes[1].set_title(f"(b) {report['config']['steer_model']}: steering")
    iso = report["isolation"].get("summary")
    if iso:
        axes[2].bar(["no pause", "another paused"], [iso["unpaused"]["p50_ms"], iso["paused"]["p50_ms"]])
        axes[2].set_title("(c) second session generate p50")
    for ax in axes:
        ax.set_ylabel("ms")
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(report: dict[str, Any]) -> str:
    """The summary as aligned text rows."""
    rows: list[tuple[str, str]] = []

    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f} ms"

    for part in ("robustness", "steering", "isolation", "hot_path"):
        if "error" in report[part]:
            rows.append((part, report[part]["error"]))
    rob = report["robustness"].get("summary")
    if rob:
        rows += [("(a) token accuracy", f"{rob['token_accuracy']:.4f} ({rob['exact_sequences']}/{rob['sequences']} exact)"),
                 ("(a) resume p50 / p99", f"{ms(rob['resume']['p50_ms'])} / {ms(rob['resume']['p99_ms'])}"),
                 ("(a) PING p50 (floor)", ms(rob["ping"]["p50_ms"])),
                 ("(a) client in its own process: resume / PING p50",
                  f"{ms(rob['client_process_resume']['p50_ms'])} / {ms(rob['client_process_ping']['p50_ms'])}"),
                 ("(a) same client: PING while paused / resume after it p50",
                  f"{ms(rob['client_process_paused_ping']['p50_ms'])} / "
                  f"{ms(rob['client_process_resume_after_ping']['p50_ms'])}"),
                 (f"(a) same client: PING {IDLE_GAP_S * 1e3:.0f} ms into a pause / after {IDLE_GAP_S * 1e3:.0f} ms idle p50",
                  f"{ms(rob['client_process_held_paused_ping']['p50_ms'])} / "
                  f"{ms(rob['client_process_idle_ping']['p50_ms'])}"),
                 ("(a) session KV / PCIe", f"{rob['session_kv_bytes']} B -> {ms(rob['kv_over_pcie_ms'])}")]
    steer = report["steering"].get("summary")
    if steer:
        rows += [("(b) output changed", f"{steer['changed_sequences']}/{steer['sequences']} sequences"),
                 ("(b) token divergence", f"{steer['token_divergence_pct']:.1f} %"),
                 ("(b) resume / scale+resume p50", f"{ms(steer['resume']['p50_ms'])} / {ms(steer['scale_resume']['p50_ms'])}"),
                 ("(b) steering overhead", ms(steer["steering_overhead_ms"])),
                 ("(b) steering overhead, client in its own process", ms(steer["client_process_steering_overhead_ms"]))]
    iso = report["isolation"].get("summary")
    if iso:
        rows.append(("(c) other session p50: free / paused",
                     f"{ms(iso['unpaused']['p50_ms'])} / {ms(iso['paused']['p50_ms'])}"))
    hot = report["hot_path"].get("summary")
    if hot:
        rows += [("(d) local runner p50", ms(hot["local"]["p50_ms"])),
                 ("(d) server compute p50 (x local)", f"{ms(hot['served_compute']['p50_ms'])} ({hot['server_compute_over_local']:.3f}x)"),
                 ("(d) client wall p50 (x local)", f"{ms(hot['served_wall']['p50_ms'])} ({hot['client_wall_over_local']:.3f}x)")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, measure, write JSON and PNG, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write (a PNG is written beside it)")
    parser.add_argument("--smoke", action="store_true", help="tiny models, short sequences (CPU, seconds)")
    parser.add_argument("--sequences", type=int, help="random sequences per part")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per request")
    parser.add_argument("--deterministic", action="store_true", help="serve in deterministic mode")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    cfg = Exp3Config.smoke() if args.smoke else Exp3Config()
    cfg = attrs.evolve(cfg, deterministic=args.deterministic)
    if args.sequences is not None:
        cfg = attrs.evolve(cfg, sequences=args.sequences)
    if args.new_tokens is not None:
        cfg = attrs.evolve(cfg, new_tokens=args.new_tokens)
    started = time.time()
    parts = measure(cfg)
    report = {
        "experiment": "exp3_interactivity", "command": "python -m eval.exp3_interactivity.run " + " ".join(argv or []),
        "commit": source_commit(), "started_at": started, "hardware": hardware(), "versions": library_versions(),
        "device": "cuda" if torch.cuda.is_available() else "cpu", "config": attrs.asdict(cfg),
        "pcie_bytes_per_s": PCIE_BYTES_PER_S, **parts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    png = args.out.with_suffix(".png")
    plot(report, png)
    print(f"wrote {args.out} and {png}")
    print(table(report))


if __name__ == "__main__":
    main()
