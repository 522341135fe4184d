"""Smoke runs of eval/bench_http.py on CPU: a complete report, every stream with all its tokens.
Timings are recorded, not judged (a CPU test machine says nothing about them)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("openai")

from eval import bench_http  # noqa: E402 - after the skip: the benchmark needs the openai client

SUMMARY_KEYS = {
    "endpoint", "streams", "ttft_p50_ratio", "http_prepare_p50_s", "http_ttft_from_sent_p50_s", "goal_ttft_p50_ratio_max", "goal_met",
    *(f"{way}_{what}" for way in ("http", "native")
      for what in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "streams_complete")),
}


def run(tmp_path, model: str) -> dict:
    out = tmp_path / "http.json"
    bench_http.main.main(["--device", "cpu", "--model", model, "--streams", "2", "--prompt-tokens", "8",
                          "--max-tokens", "4", "--tier-gb", "0.0625", "--out", str(out)], standalone_mode=False)
    return json.loads(out.read_text())


def check(report: dict, endpoint: str) -> None:
    assert {"benchmark", "command", "note", "commit", "hardware", "versions", "config", "warm_up", "raw",
            "summary"} <= set(report)
    assert report["benchmark"] == "http" and endpoint in report["note"]
    summary = report["summary"]
    assert SUMMARY_KEYS <= set(summary)
    assert summary["endpoint"] == endpoint and summary["streams"] == 2
    for way in ("http", "native"):
        assert report["warm_up"][way]["tokens"] == 2
        streams = report["raw"][way]
        assert len(streams) == 2 and summary[f"{way}_streams_complete"] == 2
        for stream in streams:
            assert stream["tokens"] == 4 and stream["finish_reason"] == "length"
            assert stream["ttft_s"] > 0 and len(stream["itl_s"]) == stream["tokens_seen"] - 1
        assert all((s["prepare_s"] is not None) == (way == "http") for s in streams)
        assert summary[f"{way}_ttft_p50_s"] > 0 and summary[f"{way}_itl_p99_s"] >= 0
    assert summary["ttft_p50_ratio"] > 0


def test_random_model_streams_token_ids_through_completions(tmp_path, capsys):
    report = run(tmp_path, "random:tiny-llama")
    check(report, "/v1/completions")
    assert report["config"]["logprobs"] == 0
    for way in ("http", "native"):
        for stream in report["raw"][way]:
            assert stream["prompt_tokens"] == 8 and stream["tokens_seen"] == 4  # every token seen as it came
    assert "TTFT p50 http/native" in capsys.readouterr().out.splitlines()[-1]


def test_model_with_a_chat_template_streams_through_chat(tmp_path):
    from djinn.testing.scripted import build_model_dir

    report = run(tmp_path, build_model_dir(tmp_path / "scripted"))
    check(report, "/v1/chat/completions")
    assert report["config"]["logprobs"] is None
    for stream in report["raw"]["http"]:
        assert stream["tokens_seen"] >= 1  # content chunks: a token without text sends none
