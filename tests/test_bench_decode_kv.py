"""eval.bench_decode with two KV dtypes in one run (``--kv-dtype auto,fp8_e4m3``), on the CPU."""

from __future__ import annotations

import json
import math

from click.testing import CliRunner

from eval import bench_decode

NEW_TOKENS = 4
PROMPTS = 2


def test_decode_benchmark_runs_each_kv_dtype_and_fp8_effect(tmp_path):
    out = tmp_path / "decode_kv.json"
    result = CliRunner().invoke(bench_decode.main, [
        "--device", "cpu", "--model", "random:tiny-llama", "--context", "24", "--new-tokens", str(NEW_TOKENS),
        "--sessions", "2", "--batches", "1,2", "--steps", "2", "--chunks", "64", "--agreement", str(PROMPTS),
        "--no-anchors", "--cpu-pool-gb", "0.02", "--kv-dtype", "auto,fp8_e4m3", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["config"]["kv_dtype"] == ["torch.float32", "torch.float8_e4m3fn"]
    assert report["config"]["decode_attention"] == "masked"

    # the first dtype: where a one-dtype run has always put it
    sections = {"single", "end_to_end", "one_at_a_time", "throughput", "agreement", "summary", "kv_pool_bytes"}
    assert sections <= set(report)
    first = report["summary"]
    for key in ("a_batch1_step_eager_ms", "b_best_s", "b_one_at_a_time_s", "c_tokens_per_s", "warm_up_s",
                "load_s", "d_sequences_identical", "run_seconds", "weight_read_floor_ms"):
        assert key in first, key
    assert first["kv_dtype"] == "torch.float32"
    assert set(first["c_tokens_per_s"]) == {"1@24", "2@24"}

    # the later dtype: the same sections and summary fields under kv_dtypes
    assert list(report["kv_dtypes"]) == ["fp8_e4m3"]
    fp8 = report["kv_dtypes"]["fp8_e4m3"]
    assert sections <= set(fp8)
    assert set(first) <= set(fp8["summary"])
    assert fp8["summary"]["kv_dtype"] == "torch.float8_e4m3fn"
    # the same pool bytes hold twice the tokens: the first runner's pool was freed before this one
    assert fp8["kv_pool_bytes"] > 0.9 * report["kv_pool_bytes"]

    effect = report["fp8_effect"]
    assert effect["reference"] == "auto" and effect["kv_dtype"] == "fp8_e4m3"
    assert len(effect["per_prompt"]) == PROMPTS
    for prompt in effect["per_prompt"]:
        assert prompt["steps"] == NEW_TOKENS
        assert 0 <= prompt["tokens_equal_before_divergence"] <= prompt["tokens_equal"] <= NEW_TOKENS
        assert 0 <= prompt["teacher_forced_argmax_agree"] <= NEW_TOKENS
        errors = [prompt[k] for k in ("rel_logit_error_prefill", "rel_logit_error_max", "rel_logit_error_mean")]
        assert all(math.isfinite(e) and e >= 0 for e in errors)
        assert prompt["rel_logit_error_mean"] <= prompt["rel_logit_error_max"]
        # fp8 KV rounds the stored keys and values: the logits move, but not far
        assert 0 < prompt["rel_logit_error_max"] < 0.5
    assert effect["tokens"] == PROMPTS * NEW_TOKENS
    # the reference's teacher-forced passes are its greedy passes
    assert effect["reference_self_check"] == f"{PROMPTS * NEW_TOKENS}/{PROMPTS * NEW_TOKENS}"
    assert fp8["summary"]["f_greedy_tokens_equal"] == f"{effect['tokens_equal']}/{effect['tokens']}"
    assert "fp8 KV against auto" in result.output


def test_a_kv_dtype_list_is_checked():
    result = CliRunner().invoke(bench_decode.main, ["--kv-dtype", "auto,int4", "--out", "unused.json"])
    assert result.exit_code != 0 and "fp8_e4m3" in result.output
    result = CliRunner().invoke(bench_decode.main, ["--kv-dtype", "auto,auto", "--out", "unused.json"])
    assert result.exit_code != 0
