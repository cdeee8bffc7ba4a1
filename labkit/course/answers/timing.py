"""Exercise set 02 (timing): per-token time and the bandwidth floor, in bf16 and with FP8
weights."""

from __future__ import annotations

from labkit.course.answers.verdict import (
    CheckResult,
    _compare,
    _config,
    _count,
    _finish,
    _positive,
)


def ms_per_token(answer, inference_time_ms: float, tokens_generated: int) -> CheckResult:
    """Average milliseconds per generated token of one measured generation."""
    total = _positive("inference_time_ms", inference_time_ms)
    n = _count("tokens_generated", tokens_generated)
    expected = total / n
    mistakes = [(n / total * 1000, "That is tokens per second; the question asks for "
                                   "milliseconds per token (its inverse, × 1000)."),
                (expected / 1000, "That is seconds per token; give milliseconds.")]
    return _finish(_compare(
        "ms_per_token", answer, expected, unit="ms/token", rel_tol=0.01, mistakes=mistakes,
        hint="inference time in ms ÷ tokens generated."))


def time_per_output_token(answer, inference_time_ms: float, time_to_first_token_ms: float,
                          tokens_generated: int) -> CheckResult:
    """TPOT as ARCHITECTURE.md defines it (vLLM's): (latency − TTFT) ÷ (tokens − 1)."""
    total = _positive("inference_time_ms", inference_time_ms)
    ttft = _positive("time_to_first_token_ms", time_to_first_token_ms)
    n = _count("tokens_generated", tokens_generated, minimum=2)
    if ttft > total:
        raise ValueError(f"time_to_first_token_ms ({ttft}) exceeds inference_time_ms ({total})")
    expected = (total - ttft) / (n - 1)
    mistakes = [(total / n, "That is the average over all tokens, prefill included; TPOT "
                            "leaves out the first token (the prompt's prefill).")]
    if n < 60:  # dividing by n instead of n − 1 only shows for short generations
        mistakes.append(((total - ttft) / n, "After the first token there are tokens − 1 "
                                             "decode steps: divide by n − 1."))
    return _finish(_compare(
        "time_per_output_token", answer, expected, unit="ms", rel_tol=0.01, mistakes=mistakes,
        hint="(inference time − time to first token) ÷ (tokens generated − 1)."))


def bandwidth_floor(answer, weight_bytes: float, bandwidth_bytes_per_s: float) -> CheckResult:
    """Fastest possible ms per token at batch 1: every weight read once per decode step."""
    from labkit.measure.roofline import decode_floor_ms

    weights = _positive("weight_bytes", weight_bytes)
    bandwidth = _positive("bandwidth_bytes_per_s", bandwidth_bytes_per_s)
    expected = decode_floor_ms(weights, bandwidth)
    mistakes = [(expected / 1000, "That is seconds; give milliseconds."),
                (expected * 1000, "That is microseconds (or a GB vs B slip); give ms."),
                (bandwidth / weights, "That is decode steps per second, the inverse.")]
    return _finish(_compare(
        "bandwidth_floor", answer, expected, unit="ms/token", rel_tol=0.02, mistakes=mistakes,
        hint="weight bytes ÷ bandwidth in bytes per second gives seconds per token; × 1000."))


def fp8_floor(answer, shape: str, bandwidth_bytes_per_s: float) -> CheckResult:
    """Fastest possible ms per token at batch 1 with FP8 weights (`--quantization fp8`): the
    bytes a step reads (`memory.fp8_step_bytes_from_config`) over the bandwidth."""
    from labkit.engine import memory
    from labkit.measure.roofline import decode_floor_ms

    config = _config(shape)
    bandwidth = _positive("bandwidth_bytes_per_s", bandwidth_bytes_per_s)
    expected = decode_floor_ms(memory.fp8_step_bytes_from_config(config), bandwidth)
    bf16 = decode_floor_ms(2 * memory.parameter_count_from_config(config), bandwidth)
    mistakes = [(bf16, "That is the bf16 floor: FP8 stores each weight in one byte, not two."),
                (expected / 2, "FP8 is one byte a weight (8 bits), not half a byte."),
                (expected / 1000, "That is seconds; give milliseconds."),
                (expected * 1000, "That is microseconds (or a GB vs B slip); give ms.")]
    return _finish(_compare(
        "fp8_floor", answer, expected, unit="ms/token", rel_tol=0.02, mistakes=mistakes,
        hint="the bytes a step reads: one byte per weight of the products and lm_head (their "
             "scales and the norms add well under 1 %), ÷ bandwidth in bytes per second, "
             "× 1000."))
