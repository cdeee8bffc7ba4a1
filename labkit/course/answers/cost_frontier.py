"""Exercise set 09 (the cost frontier): the knee, the highest concurrency under an SLO, the price
of a million tokens, the GPUs a traffic needs and their monthly bill."""

from __future__ import annotations

import math

from labkit.course.answers.verdict import (
    CHOICE_CLOSE,
    CheckResult,
    _choice,
    _compare,
    _count,
    _finish,
    _number,
    _percent,
    _positive,
    _result,
    _rows,
    _whole,
)
from labkit.measure import cost, sweep

SECONDS_PER_DAY = 86_400


def _points(rows, level_key: str, keys: dict[str, str]) -> list[dict]:
    """The learner's rows as sweep points: their level and the figures `keys` maps from
    (the sweep's name -> the row's name)."""
    table = _rows(rows, (level_key, *keys.values()))
    return [{"level": r[level_key], **{ours: r[theirs] for ours, theirs in keys.items()}}
            for r in table]


def knee_concurrency(answer, rows, *, level_key: str = "concurrency",
                     throughput_key: str = "output_tokens_per_sec",
                     per_user_key: str = "tokens_per_user") -> CheckResult:
    """The knee of a measured curve: the concurrency whose output tok/s × tok/s per user is
    highest (`labkit.measure.sweep.knee`). A choice among the measured levels: ✅ only for that
    one; 🟡 for another whose product is within CHOICE_CLOSE of the knee's (a near tie); ❌
    otherwise, with the usual mistakes named (the highest throughput, the fastest per user)."""
    exercise = "knee_concurrency"
    points = _points(rows, level_key, {"output_tokens_per_sec": throughput_key,
                                       "tokens_per_user": per_user_key})
    top = sweep.knee(points)
    if top is None:
        raise ValueError("no row has both a finite throughput and a finite speed per user")
    expected = top["level"]
    value = _number(exercise, answer)
    if isinstance(value, CheckResult):
        return _finish(value)
    rule = (f"one of the measured concurrencies: ✅ for the knee, 🟡 for one whose throughput × "
            f"per-user speed is within {_percent(CHOICE_CLOSE)} of the knee's")
    unmeasured = _choice(exercise, value, [p["level"] for p in points], "concurrencies", rule,
                         answer, expected)
    if unmeasured is not None:
        return _finish(unmeasured)
    if value == expected:
        return _finish(_result(
            exercise, "correct", f"correct — the knee is at concurrency {value:g}: "
            f"{top['output_tokens_per_sec']:.4g} tok/s at {top['tokens_per_user']:.4g} tok/s "
            "per user.", answer, expected))
    chosen = next(p for p in points if p["level"] == value)
    short = 1 - _product(chosen) / _product(top)
    status = "close" if short <= CHOICE_CLOSE else "wrong"
    return _finish(_result(
        exercise, status, f"{'close' if status == 'close' else 'not yet'} — at concurrency "
        f"{value:g} throughput × per-user speed is {short:.1%} below the highest ({rule}). "
        + _knee_hint(chosen, points), answer, expected))


def _product(point: dict) -> float:
    return point["output_tokens_per_sec"] * point["tokens_per_user"]


def _knee_hint(chosen: dict, points: list[dict]) -> str:
    finite = [p for p in points if math.isfinite(_product(p))]
    if chosen is max(finite, key=lambda p: p["output_tokens_per_sec"]):
        return ("That is the highest throughput: past the knee, where each step up in load "
                "costs more per-user speed than it adds in throughput.")
    if chosen is max(finite, key=lambda p: p["tokens_per_user"]):
        return ("That is the fastest per user: before the knee, where more load still buys "
                "throughput for less per-user speed than it adds.")
    return "Hint: multiply each row's output tok/s by its tok/s per user and take the largest."


def highest_concurrency_meeting_slo(answer, rows, ttft_p95_ms: float, tokens_per_user: float,
                                    *, level_key: str = "concurrency",
                                    ttft_key: str = "ttft_p95_ms",
                                    per_user_key: str = "tokens_per_user") -> CheckResult:
    """The highest measured concurrency whose p95 TTFT is at most `ttft_p95_ms` and whose tok/s
    per user is at least `tokens_per_user` (`labkit.measure.sweep.SLO.point_ok`). A choice among
    the measured levels: ✅ only for that one; 🟡 for a lower one that also meets the SLO (safe,
    but it leaves throughput unused); ❌ for one that misses it."""
    exercise = "highest_concurrency_meeting_slo"
    slo = sweep.SLO(_positive("ttft_p95_ms", ttft_p95_ms),
                    _positive("tokens_per_user", tokens_per_user))
    points = _points(rows, level_key, {"ttft_p95_ms": ttft_key,
                                       "tokens_per_user": per_user_key})
    meeting = [p for p in points if slo.point_ok(p)]
    if not meeting:
        raise ValueError(f"no measured concurrency meets {slo.describe()}: loosen the SLO")
    expected = max(p["level"] for p in meeting)
    value = _number(exercise, answer)
    if isinstance(value, CheckResult):
        return _finish(value)
    rule = ("one of the measured concurrencies: ✅ for the highest that meets the SLO, 🟡 for a "
            "lower one that meets it too")
    unmeasured = _choice(exercise, value, [p["level"] for p in points], "concurrencies", rule,
                         answer, expected)
    if unmeasured is not None:
        return _finish(unmeasured)
    chosen = next(p for p in points if p["level"] == value)
    if value == expected:
        return _finish(_result(
            exercise, "correct", f"correct — concurrency {value:g} meets {slo.describe()} "
            f"(p95 TTFT {chosen['ttft_p95_ms']:.4g} ms, {chosen['tokens_per_user']:.4g} tok/s "
            "per user), and no higher measured one does.", answer, expected))
    if slo.point_ok(chosen):
        return _finish(_result(
            exercise, "close", f"close — concurrency {value:g} meets the SLO, but a higher "
            f"measured one does too ({rule}). Hint: check every row, not only the first that "
            "meets it.", answer, expected))
    return _finish(_result(
        exercise, "wrong", f"not yet — concurrency {value:g} misses the SLO: p95 TTFT "
        f"{chosen['ttft_p95_ms']:.4g} ms (at most {slo.ttft_p95_ms:g}), "
        f"{chosen['tokens_per_user']:.4g} tok/s per user (at least {slo.tokens_per_user:g}) "
        f"({rule}). Hint: both conditions must hold.", answer, expected))


def cost_per_million_tokens(answer, hourly_price: float, tokens_per_second: float
                            ) -> CheckResult:
    """Dollars per million output tokens from a GPU at `hourly_price` that generates
    `tokens_per_second` (`labkit.measure.cost.cost_per_million_tokens`)."""
    expected = cost.cost_per_million_tokens(hourly_price, tokens_per_second)
    mistakes = [(expected / 1e6, "That is the price of one token: × 10⁶ for a million."),
                (expected / 1e3, "That is per thousand tokens: × 10⁶, not 10³, for a million."),
                (expected * 60, "An hour has 3,600 seconds, not 60: tokens per hour = tok/s × "
                                "3,600."),
                (expected * 3600, "The price is per hour and the throughput per second: "
                                  "multiply the tok/s by 3,600 first.")]
    return _finish(_compare(
        "cost_per_million_tokens", answer, expected, unit="$/M tokens", rel_tol=0.01,
        mistakes=mistakes, hint="price per hour ÷ (tok/s × 3,600 s) × 10⁶."))


def gpus_for_traffic(answer, daily_tokens: float, tokens_per_second_per_gpu: float
                     ) -> CheckResult:
    """GPUs that generate `daily_tokens` output tokens a day, spread evenly, each at a measured
    `tokens_per_second_per_gpu` (`labkit.measure.cost.gpus_needed`). A whole number: ✅ only
    when exact, 🟡 when only the rounding is off."""
    per_gpu = _positive("tokens_per_second_per_gpu", tokens_per_second_per_gpu)
    demand = _positive("daily_tokens", daily_tokens) / SECONDS_PER_DAY
    expected = cost.gpus_needed(demand, per_gpu)
    rounding = [(math.floor(demand / per_gpu + 1e-9), "one too few; round up, as a fraction of "
                                                      "a GPU cannot be rented"),
                (demand / per_gpu, "GPUs come whole: round up")]
    mistakes = [(math.ceil(daily_tokens / per_gpu), "That divides a day's tokens by a second's "
                 "throughput: turn the daily traffic into tokens per second first (÷ 86,400).")]
    return _finish(_whole("gpus_for_traffic", answer, expected, noun="GPUs", rounds="up",
                          rounding=rounding, mistakes=mistakes,
                          hint="tokens per second needed = daily tokens ÷ 86,400; ÷ one GPU's "
                               "tok/s at the SLO, rounded up."))


def monthly_gpu_cost(answer, gpus: int, hourly_price: float) -> CheckResult:
    """Dollars a month for `gpus` GPUs around the clock at `hourly_price` each
    (`labkit.measure.cost.monthly_cost`: 730 hours a month, 8,760 ÷ 12; a 30-day month's 720
    is within the tolerance)."""
    count = _count("gpus", gpus)
    expected = cost.monthly_cost(count, hourly_price)
    mistakes = [(expected / count, "That is one GPU's month: multiply by the number of GPUs."),
                (expected / cost.HOURS_PER_MONTH * 24, "That is one day: a month has about "
                                                       "730 hours (8,760 ÷ 12).")]
    return _finish(_compare(
        "monthly_gpu_cost", answer, expected, unit="$/month", rel_tol=0.02, mistakes=mistakes,
        hint="GPUs × price per hour × 730 hours a month."))
