"""What the OpenAI-compatible HTTP API adds to streaming latency, beside the native client.

    python -m eval.bench_http --model random:llama-7b --out eval/results/http_<tag>.json
    python -m eval.bench_http --device cpu --model random:tiny-llama --streams 2 --prompt-tokens 8 \\
        --max-tokens 4 --out ...

One server in this process (``BackgroundServer`` with the default plugins and the HTTP API on a
free port). ``--streams`` streams start at once, each a fresh ``--prompt-tokens``-token prompt and
``--max-tokens`` greedy tokens with the end-of-sequence token ignored; first through the official
``openai`` client (``AsyncOpenAI``, ``stream=True``), then through the native client's
``session.stream`` (one connection and one session per stream, opened before the clock starts, as
an agent holds its session), same server, same shape of work. Each stream records the time from
its request to its first token (TTFT) and between the tokens after that (ITL), on this process's
clock, as the client sees them arrive. HTTP streams also record when the ``openai`` client handed
each request to httpx (an httpx request hook): the client builds its requests one after another on
its event loop, about 20 ms each for a 1024-token-id prompt (it walks the list item by item), so
the summary gives the TTFT from sending beside the TTFT from asking.

A model with a tokenizer and a chat template is driven through ``/v1/chat/completions`` (a user
message rendered to about ``--prompt-tokens`` tokens; the native client sends the token ids the
server renders it to). A ``random:NAME`` model has no tokenizer, so it is driven through
``/v1/completions`` with token-id prompts and ``logprobs=0``: without a tokenizer a stream's text
is empty and only the per-token log-probabilities tell the client a token was picked, so the
native streams ask for them too (the server's work is the same both ways).

The clients run on this process's main thread, the server on its own threads: the two share the
interpreter, as a client on the same host would share its cores.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import click
import torch

from djinn.client import connect_async
from djinn.config import DjinnConfig
from djinn.kernel.plugins import get_plugin_manager
from djinn.server.launch import BackgroundServer
from eval.report import result_header

#: the goal: the HTTP API adds at most this much to the native TTFT p50
GOAL_TTFT_RATIO = 1.10


@attrs.define
class StreamSample:
    """One stream as its client saw it: when it asked and when each token arrived."""

    prompt_tokens: int
    started: float
    #: arrival time of each token event (a chunk or frame may carry several tokens)
    arrivals: list[float] = attrs.Factory(list)
    #: tokens generated, as the response says (usage, or the native reply)
    tokens: int = 0
    finish_reason: str | None = None
    #: when the HTTP client handed the request to its transport (None for native streams)
    sent: float | None = None

    def record(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens, "tokens": self.tokens, "tokens_seen": len(self.arrivals),
            "finish_reason": self.finish_reason,
            "ttft_s": self.arrivals[0] - self.started if self.arrivals else None,
            "itl_s": [b - a for a, b in zip(self.arrivals, self.arrivals[1:])],
            "prepare_s": self.sent - self.started if self.sent is not None else None,
            "ttft_from_sent_s": self.arrivals[0] - self.sent if self.arrivals and self.sent is not None else None,
        }


@attrs.frozen
class Workload:
    """One stream's request: the prompt's token ids, and the chat messages that render to them."""

    ids: list[int]
    messages: list[dict[str, str]] | None = None


def _random_ids(count: int, vocab: int, generator: torch.Generator) -> list[int]:
    return torch.randint(0, vocab, (count,), generator=generator).tolist()


def _rendered(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The token ids the server's chat route renders ``messages`` to (it does exactly this)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_workload(tokenizer: Any, target: int, vocab: int, generator: torch.Generator) -> Workload:
    """A user message of random tokens whose rendering is about ``target`` tokens long (text
    re-tokenizes to a different count, so the length is corrected a few times)."""
    pool = _random_ids(4 * target + 64, vocab, generator)
    length = target
    for _ in range(6):
        messages = [{"role": "user", "content": tokenizer.decode(pool[:length], skip_special_tokens=True)}]
        ids = _rendered(tokenizer, messages)
        if len(ids) == target or not 1 <= length + target - len(ids) <= len(pool):
            break
        length += target - len(ids)
    return Workload(ids=ids, messages=messages)


def workloads(tokenizer: Any, chat: bool, streams: int, prompt_tokens: int, vocab: int, seed: int) -> list[Workload]:
    """``streams`` fresh prompts (a fresh seed per call, so no prompt repeats another's prefix)."""
    generator = torch.Generator().manual_seed(seed)
    if chat:
        return [chat_workload(tokenizer, prompt_tokens, vocab, generator) for _ in range(streams)]
    return [Workload(ids=_random_ids(prompt_tokens, vocab, generator)) for _ in range(streams)]


# ---------------------------------------------------------------------- the two clients


#: the HTTP stream whose request the running task is sending (read by the transport's hook)
_SENDING: contextvars.ContextVar[StreamSample | None] = contextvars.ContextVar("bench_http_sending", default=None)


async def _mark_sent(request: Any) -> None:
    """httpx's request hook: the client has built the request and sends it now."""
    sample = _SENDING.get()
    if sample is not None and sample.sent is None:
        sample.sent = time.perf_counter()


async def http_stream(client: Any, model: str, work: Workload, max_tokens: int, logprobs: int | None) -> StreamSample:
    """One streamed completion through the ``openai`` client (chat when ``work`` has messages)."""
    common: dict[str, Any] = dict(model=model, max_tokens=max_tokens, temperature=0, stream=True,
                                  stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    sample = StreamSample(prompt_tokens=len(work.ids), started=time.perf_counter())
    _SENDING.set(sample)  # each stream is its own task, so its own context
    if work.messages is not None:
        stream = await client.chat.completions.create(messages=work.messages, **common)
    else:
        stream = await client.completions.create(prompt=work.ids, logprobs=logprobs, **common)
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            sample.tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if work.messages is not None:
                seen = 1 if choice.delta.content else 0
            else:
                seen = len(choice.logprobs.tokens or []) if choice.logprobs is not None else 0
            sample.arrivals.extend([now] * seen)
            sample.finish_reason = choice.finish_reason or sample.finish_reason
    return sample


async def native_stream(session: Any, work: Workload, max_tokens: int, logprobs: int | None) -> StreamSample:
    """One ``session.stream`` through the native client, on a session already open."""
    sample = StreamSample(prompt_tokens=len(work.ids), started=time.perf_counter())
    stream = session.stream(work.ids, max_tokens, ignore_eos=True, logprobs=logprobs)
    async for _token in stream:
        sample.arrivals.append(time.perf_counter())
    sample.tokens, sample.finish_reason = len(stream.result.tokens), stream.result.finish_reason
    return sample


async def run_http(base_url: str, token: str | None, model: str, works: Sequence[Workload], max_tokens: int,
                   logprobs: int | None) -> list[StreamSample]:
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient

    transport = DefaultAsyncHttpxClient(timeout=600.0, event_hooks={"request": [_mark_sent]})
    async with AsyncOpenAI(base_url=base_url, api_key=token or "none", max_retries=0, http_client=transport) as client:
        return list(await asyncio.gather(*(http_stream(client, model, w, max_tokens, logprobs) for w in works)))


async def run_native(url: str, token: str | None, works: Sequence[Workload], max_tokens: int,
                     logprobs: int | None) -> list[StreamSample]:
    clients = [await connect_async(url, token) for _ in works]
    try:
        sessions = [await (await c.model()).session() for c in clients]
        samples = await asyncio.gather(*(native_stream(s, w, max_tokens, logprobs) for s, w in zip(sessions, works)))
        for session in sessions:
            await session.close()
        return list(samples)
    finally:
        for client in clients:
            await client.close()


# ---------------------------------------------------------------------- summary


def _p50(samples: list[float]) -> float | None:
    return statistics.median(samples) if samples else None


def _p99(samples: list[float]) -> float | None:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None


def summarize(raw: dict[str, list[dict[str, Any]]], max_tokens: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for way in ("http", "native"):
        ttft = [s["ttft_s"] for s in raw[way] if s["ttft_s"] is not None]
        itl = [gap for s in raw[way] for gap in s["itl_s"]]
        out.update({f"{way}_ttft_p50_s": _p50(ttft), f"{way}_ttft_p99_s": _p99(ttft),
                    f"{way}_itl_p50_s": _p50(itl), f"{way}_itl_p99_s": _p99(itl),
                    f"{way}_streams_complete": sum(s["tokens"] == max_tokens for s in raw[way])})
    http, native = out["http_ttft_p50_s"], out["native_ttft_p50_s"]
    out["ttft_p50_ratio"] = http / native if http and native else None
    # the openai client builds requests one after another on its loop (it walks a token-id prompt
    # item by item): how long that took, and the TTFT from the moment each request was sent
    prepare = [s["prepare_s"] for s in raw["http"] if s["prepare_s"] is not None]
    from_sent = [s["ttft_from_sent_s"] for s in raw["http"] if s["ttft_from_sent_s"] is not None]
    out.update({"http_prepare_p50_s": _p50(prepare), "http_prepare_max_s": max(prepare, default=None),
                "http_ttft_from_sent_p50_s": _p50(from_sent), "http_ttft_from_sent_p99_s": _p99(from_sent)})
    out["goal_ttft_p50_ratio_max"] = GOAL_TTFT_RATIO
    out["goal_met"] = out["ttft_p50_ratio"] is not None and out["ttft_p50_ratio"] <= GOAL_TTFT_RATIO
    out["streams"] = len(raw["http"])
    return out


def _ms(value: float | None) -> str:
    return f"{value * 1e3:10.2f}" if value is not None else f"{'-':>10}"


@click.command()
@click.option("--model", "model_name", default="random:llama-7b", help="random:NAME or a local checkpoint directory")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda")
@click.option("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
@click.option("--streams", default=32, help="concurrent streams each way")
@click.option("--prompt-tokens", default=1024)
@click.option("--max-tokens", default=50, help="tokens generated per stream (end-of-sequence ignored)")
@click.option("--rounds", default=1, help="repeat the HTTP-then-native pair, fresh prompts each time")
@click.option("--tier-gb", default=4.0, help="the pinned_host tier's capacity")
@click.option("--gpu-budget-gb", default=0.0, help="the server's GPU budget (0: the device's free memory)")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def main(model_name: str, device: str, dtype: str | None, streams: int, prompt_tokens: int, max_tokens: int,
         rounds: int, tier_gb: float, gpu_budget_gb: float, out: Path) -> None:
    """Stream the same workload through the HTTP API and the native client; write one JSON result file."""
    if device == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("no CUDA device; pass --device cpu for a CPU run")
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    base = DjinnConfig()
    config = attrs.evolve(
        base,
        server=attrs.evolve(base.server, port=0, metrics_port=0),
        model=attrs.evolve(base.model, name=model_name, dtype=dtype, device=device),
        memory=attrs.evolve(base.memory, gpu_memory_budget_gb=gpu_budget_gb),
        settings={"pinned_host": {"capacity_gb": tier_gb}},
    )
    started = time.perf_counter()
    server = BackgroundServer(config, get_plugin_manager(config), http_port=0).start()
    load_s = time.perf_counter() - started
    raw: dict[str, list[dict[str, Any]]] = {"http": [], "native": []}
    try:
        tokenizer = server.model.loaded.tokenizer
        chat = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
        # without a tokenizer a streamed chunk's text is empty: the log-probabilities mark each token
        logprobs = None if chat else 0
        vocab = server.model.runner.vocab_size
        native_url = server.url("tcp")

        async def measure() -> dict[str, Any]:
            warm = workloads(tokenizer, chat, 1, 8, vocab, seed=1 << 20)
            warm_up = {"http": (await run_http(server.http_url, None, model_name, warm, 2, logprobs))[0].record(),
                       "native": (await run_native(native_url, None, warm, 2, logprobs))[0].record()}
            for round_ in range(rounds):
                works = workloads(tokenizer, chat, streams, prompt_tokens, vocab, seed=2 * round_)
                raw["http"] += [s.record() for s in await run_http(server.http_url, None, model_name, works,
                                                                   max_tokens, logprobs)]
                works = workloads(tokenizer, chat, streams, prompt_tokens, vocab, seed=2 * round_ + 1)
                raw["native"] += [s.record() for s in await run_native(native_url, None, works, max_tokens, logprobs)]
            return warm_up

        warm_up = asyncio.run(measure())
        device_name = str(server.model.device)
    finally:
        server.stop()
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    how = ("chat messages rendered by the model's template" if chat else
           "token-id prompts and logprobs=0 both ways: the model has no tokenizer, so no chat template "
           "and no text, and the per-token log-probabilities are what mark each token in the HTTP stream")
    report: dict[str, Any] = {
        **result_header(
            "http", "eval.bench_http",
            f"{'random weights of the named shape' if model_name.startswith('random:') else model_name}; "
            f"{dtype} on {device_name}; HTTP through the openai client against {endpoint}, {how}; "
            "stream=True, then the native client's session.stream over tcp loopback; one server, "
            "clients in the same process; greedy, end-of-sequence ignored",
            dict(model=model_name, dtype=dtype, device=device, streams=streams, prompt_tokens=prompt_tokens,
                 max_tokens=max_tokens, rounds=rounds, tier_gb=tier_gb, gpu_budget_gb=gpu_budget_gb,
                 endpoint=endpoint, logprobs=logprobs, plugins=list(server.plugins.selection.names())),
        ),
        "load_s": load_s,
        "warm_up": warm_up,
        "raw": raw,
        "summary": {"endpoint": endpoint, **summarize(raw, max_tokens)},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    summary = report["summary"]
    click.echo(f"{streams} streams x {rounds} round(s), {prompt_tokens}-token prompts, {max_tokens} tokens, {endpoint}")
    click.echo(f"{'(ms)':>8} {'TTFT p50':>10} {'TTFT p99':>10} {'ITL p50':>10} {'ITL p99':>10}  complete")
    for way in ("http", "native"):
        click.echo(f"{way:>8} {_ms(summary[f'{way}_ttft_p50_s'])} {_ms(summary[f'{way}_ttft_p99_s'])} "
                   f"{_ms(summary[f'{way}_itl_p50_s'])} {_ms(summary[f'{way}_itl_p99_s'])}  "
                   f"{summary[f'{way}_streams_complete']}/{len(raw[way])}")
    click.echo(f"http: requests sent after {_ms(summary['http_prepare_p50_s']).strip()} ms p50 "
               f"({_ms(summary['http_prepare_max_s']).strip()} ms last) in the client; TTFT from sending "
               f"{_ms(summary['http_ttft_from_sent_p50_s']).strip()} ms p50")
    ratio = summary["ttft_p50_ratio"]
    click.echo(f"TTFT p50 http/native: {ratio:.3f} (goal <= {GOAL_TTFT_RATIO})" if ratio else "TTFT p50 ratio: -")


if __name__ == "__main__":
    main()
