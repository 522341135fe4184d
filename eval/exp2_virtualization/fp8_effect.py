"""What fp8 weights do to a model's outputs, against the same model's bf16 weights.

    python -m eval.exp2_virtualization.fp8_effect --out eval/results/fp8_effect_cpu.json

For each shape (random weights, seeded), the bf16 model and its fp8 quantization
(``load_model(weight_dtype="fp8_e4m3")``: e4m3, one scale per output channel, the same draws):

- the weights: relative RMS error of the quantized weight matrices, and their largest error
  relative to e4m3's bound (1/16 of a normal value, 2^-10 of the row's scale below that);
- teacher-forced: the bf16 model greedily continues each prompt; both fp8 GEMM paths of the
  ``ringbuffer`` streamer (``dequantize`` and ``scaled_mm``) then read the same tokens in one pass,
  and their logits at every continuation position are compared with bf16's (largest and mean
  absolute error, error norm over logit norm, KL(bf16 || fp8), top-1 agreement). For scale, the
  same comparison of the bf16 weights computed in float32 (``float32_compute_against_bf16``):
  what bf16's own rounding moves;
- free-running: the fp8 model (``dequantize``) continues each prompt greedily on its own; how many
  sequences equal bf16's and how many tokens agree before the first difference.

The free-running fp8 model is the dequantized weights served resident, which computes exactly
what the streamed ``dequantize`` path computes; the run checks that on the first sequence of
every shape (``streamed_equals_dequantized``: the logits bit for bit). The shapes are ones both weight formats run on this
machine; the figures say how far fp8 moves these random-weight models, not a real checkpoint's
quality.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from djinn.engine.models import FP8, LoadedModel, decoder_layers, dequantize_weights, load_model
from djinn.engine.runner import ModelRunner, greedy_generate
from djinn.plugins.streamers.resident import ResidentStreamer
from djinn.plugins.streamers.ringbuffer import RingbufferSettings, RingbufferStreamer
from eval.report import result_header

NOTE = ("random weights of the named shapes (seeded, as the server loads them); fp8 = e4m3 with one "
        "float32 scale per output channel, quantized from the same bf16 draws")


@attrs.frozen
class EffectSettings:
    """What one run compares."""

    models: tuple[str, ...] = ("random:tiny-llama", "random:tiny-mistral", "random:tinyllama-1.1b")
    dtype: str = "bfloat16"
    prompts: int = 4
    prompt_tokens: int = 32
    new_tokens: int = 24
    seed: int = 0


def _prompts(vocab: int, settings: EffectSettings) -> list[list[int]]:
    generator = torch.Generator().manual_seed(settings.seed)
    return torch.randint(vocab, (settings.prompts, settings.prompt_tokens), generator=generator).tolist()


def _runner(loaded: LoadedModel, fp8_matmul: str | None) -> ModelRunner:
    """A CPU runner: the resident streamer for weights in the model dtype, the ringbuffer
    (every layer resident, no budget to split) for fp8."""
    if fp8_matmul is None:
        return ModelRunner(loaded, streamer=ResidentStreamer())
    streamer = RingbufferStreamer(RingbufferSettings(fp8_matmul=fp8_matmul, kv_reserve_fraction=0.0))
    return ModelRunner(loaded, streamer=streamer, budget_bytes=1 << 62)


@torch.inference_mode()
def _sequence_logits(runner: ModelRunner, tokens: list[int]) -> torch.Tensor:
    """float32 logits ``[T, vocab]`` at every position of ``tokens``, from one pass."""
    cursor = runner.begin(runner.new_kv(), runner.ids_tensor(tokens))
    cursor.run()
    return runner.family.head(runner.family.norm(cursor.hidden))[0].float()


def _greedy(runner: ModelRunner, prompt: list[int], new_tokens: int) -> list[int]:
    return greedy_generate(runner, runner.new_kv(), runner.ids_tensor(prompt), new_tokens)


def weight_errors(plain: LoadedModel, fp8: LoadedModel) -> dict[str, float]:
    """Relative RMS error of the quantized weight matrices, and the largest error over e4m3's bound."""
    squared_error = squared = 0.0
    worst = 0.0
    for ours, theirs in zip(decoder_layers(fp8.model), decoder_layers(plain.model)):
        originals = {n: m.weight for n, m in theirs.named_modules() if isinstance(m, torch.nn.Linear)}
        for name, module in ours.named_modules():
            if getattr(module, "weight", None) is None or module.weight.dtype != FP8:
                continue
            original = originals[name].float()  # [out, in]
            values = module.weight.float() * module.weight_scale[:, None]
            error = original - values
            squared_error += float(error.square().sum())
            squared += float(original.square().sum())
            bound = 2**-4 * original.abs() + 2**-10 * module.weight_scale[:, None]
            worst = max(worst, float((error.abs() / bound).max()))
    return {"relative_rms_error": (squared_error / squared) ** 0.5, "max_error_over_e4m3_bound": worst}


def compare_logits(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """``[T, vocab]`` logits of one sequence against the reference's."""
    error = other - reference
    log_p, log_q = reference.log_softmax(-1), other.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [T]
    return {
        "max_abs_error": float(error.abs().max()),
        "mean_abs_error": float(error.abs().mean()),
        "relative_error": float(error.norm() / reference.norm()),
        "mean_kl": float(kl.mean()),
        "top1_agreement": float((reference.argmax(-1) == other.argmax(-1)).float().mean()),
        "reference_logit_std": float(reference.std()),
    }


def _mean(records: list[dict[str, float]]) -> dict[str, float]:
    """Per key: the mean over sequences, the largest for ``max_abs_error``."""
    return {k: (max if k == "max_abs_error" else statistics.fmean)([r[k] for r in records]) for k in records[0]}


def measure(spec: str, settings: EffectSettings) -> dict[str, Any]:
    """Every figure of the module docstring for one shape."""
    started = time.perf_counter()
    plain = load_model(spec, dtype=settings.dtype, seed=settings.seed, progress=True)
    fp8 = load_model(spec, dtype=settings.dtype, seed=settings.seed, weight_dtype="fp8_e4m3", progress=True)
    weights = weight_errors(plain, fp8)
    bf16 = _runner(plain, None)
    prompts = _prompts(bf16.vocab_size, settings)
    continued = [_greedy(bf16, prompt, settings.new_tokens) for prompt in prompts]
    sequences = [prompt + tokens for prompt, tokens in zip(prompts, continued)]
    # the logits that predict each continuation token: from the last prompt position on
    span = slice(settings.prompt_tokens - 1, -1)
    references = [_sequence_logits(bf16, sequence)[span] for sequence in sequences]
    del bf16

    def copy_of(loaded: LoadedModel, dtype: torch.dtype | None = None) -> LoadedModel:
        model = copy.deepcopy(loaded.model)
        if dtype is not None:
            model.to(dtype)
        return attrs.evolve(loaded, model=model, config=model.config, dtype=dtype or loaded.dtype)

    # the scale of bf16's own rounding: the same bf16 weights computed in float32
    wide = _runner(copy_of(plain, torch.float32), None)
    rounding = _mean([compare_logits(r, _sequence_logits(wide, sequence)[span]) for r, sequence in zip(references, sequences)])
    del wide, plain

    # the streamed dequantize path, on the first sequence: the check that the resident
    # dequantized model below computes what it computes
    streamed = _sequence_logits(_runner(copy_of(fp8), "dequantize"), sequences[0])[span]
    scaled = _runner(copy_of(fp8), "scaled_mm")
    scaled_mm = _mean([
        compare_logits(r, _sequence_logits(scaled, sequence)[span]) for r, sequence in zip(references, sequences)
    ])
    del scaled
    dequantize_weights(fp8.model, fp8.dtype)
    resident = _runner(fp8, None)
    logits = [_sequence_logits(resident, sequence)[span] for sequence in sequences]
    teacher_forced = {"dequantize": _mean([compare_logits(r, o) for r, o in zip(references, logits)]),
                      "scaled_mm": scaled_mm}
    free = [_greedy(resident, prompt, settings.new_tokens) for prompt in prompts]
    agree_until = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(continued, free)]
    return {
        "model": spec,
        "layers": fp8.config.num_hidden_layers,
        "parameters": sum(p.numel() for p in fp8.model.parameters()),
        "weights": weights,
        "teacher_forced": teacher_forced,
        "float32_compute_against_bf16": rounding,
        "free_running_dequantize": {
            "sequences_identical": sum(x == y for x, y in zip(continued, free)),
            "sequences": len(free),
            "token_agreement": statistics.fmean(
                sum(a == b for a, b in zip(x, y)) / len(x) for x, y in zip(continued, free)
            ),
            "tokens_before_first_difference": agree_until,
        },
        "streamed_equals_dequantized": torch.equal(streamed, logits[0]),
        "bf16_tokens": continued,
        "fp8_tokens": free,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the command line, measure every shape, write the JSON, print a table."""
    defaults = EffectSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(defaults.models), help="comma-separated model specs")
    parser.add_argument("--prompts", type=int, default=defaults.prompts)
    parser.add_argument("--prompt-tokens", type=int, default=defaults.prompt_tokens)
    parser.add_argument("--new-tokens", type=int, default=defaults.new_tokens)
    parser.add_argument("--out", type=Path, default=Path("eval/results/fp8_effect_cpu.json"))
    args = parser.parse_args(argv)
    settings = EffectSettings(
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()), prompts=args.prompts,
        prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
    )
    started = time.perf_counter()
    results = []
    for spec in settings.models:
        print(f"{spec} ...", file=sys.stderr)
        results.append(measure(spec, settings))
    report = {
        **result_header("fp8_effect", "eval.exp2_virtualization.fp8_effect", NOTE, attrs.asdict(settings),
                        sys.argv[1:] if argv is None else argv),
        "results": results,
        "total_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    print(f"{'model':<24} {'weights rms':>11} {'GEMM':>10} {'max |dlogit|':>12} {'rel err':>8} {'KL':>8} "
          f"{'top-1':>6} {'greedy same':>11}")
    for r in results:
        free = r["free_running_dequantize"]
        rows = {**r["teacher_forced"], "fp32 vs bf16": r["float32_compute_against_bf16"]}
        for path, figures in rows.items():
            same = f"{free['sequences_identical']}/{free['sequences']}" if path == "dequantize" else "-"
            print(f"{r['model']:<24} {r['weights']['relative_rms_error']:>11.4f} {path:>10} "
                  f"{figures['max_abs_error']:>12.3f} {figures['relative_error']:>8.3f} {figures['mean_kl']:>8.4f} "
                  f"{figures['top1_agreement']:>6.3f} {same:>11}")
    return report


if __name__ == "__main__":
    main()
