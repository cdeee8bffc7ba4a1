"""Exercise set 05 (utilization and cost): idle time, effective cost, the timeline."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from labkit.course.answers.verdict import (
    CheckResult,
    _compare,
    _finish,
    _finite_values,
    _number,
    _result,
    _unanswered,
)
from labkit.measure.utilization import IDLE_THRESHOLD_PCT


def idle_percent(answer, utilization_trace: Iterable[float],
                 threshold: float = IDLE_THRESHOLD_PCT) -> CheckResult:
    """Percent of samples with utilization below `threshold` % (ARCHITECTURE.md's idle fraction)."""
    trace = _finite_values("utilization_trace", utilization_trace)
    expected = 100 * float(np.mean(trace < threshold))
    mistakes = [(expected / 100, "That is a fraction; give a percentage (× 100)."),
                (100 - expected, "That is the busy share; idle is the rest."),
                (100 * float(np.mean(trace <= threshold)), f"Idle means strictly below "
                                                           f"{threshold:g} %."),
                (100 * float(np.mean(trace == 0)), f"Count every sample below {threshold:g} %, "
                                                   "not only exact zeros."),
                (100 - float(np.mean(trace)), "That is 100 − mean utilization; idle % counts "
                                              "samples below the threshold.")]
    return _finish(_compare(
        "idle_percent", answer, expected, unit="%", abs_tol=0.5, mistakes=mistakes,
        hint=f"the share of samples with utilization < {threshold:g} %, as a percentage: "
             f"100 * np.mean(np.asarray(trace) < {threshold:g})."))


def effective_cost(answer, hourly_price: float, utilization: float) -> CheckResult:
    """Dollars per hour of useful GPU compute: `labkit.measure.cost.effective_cost`
    (utilization is a fraction, 0.18 for 18 %)."""
    from labkit.measure import cost

    reference = cost.effective_cost(hourly_price, utilization)
    expected = reference.per_useful_hour
    mistakes = [(reference.hourly_price * reference.utilization, "You multiplied: the less the "
                 "GPU works, the more each useful hour costs, so divide by the utilization."),
                (reference.idle_cost_per_hour, "That is the idle cost per paid hour; the "
                 "question asks what one hour of useful compute costs."),
                (expected / 100, "Use utilization as a fraction (0.18), not a percentage (18).")]
    return _finish(_compare(
        "effective_cost", answer, expected, unit="$/useful hour", rel_tol=0.01,
        mistakes=mistakes, hint="price per hour ÷ utilization (as a fraction)."))


def timeline_request_count(answer, request_spans: Sequence[tuple[float, float]],
                           window: tuple[float, float] | None = None) -> CheckResult:
    """How many requests ran (overlapped `window`, or at all) in a timeline of (start, end).
    A count read off a chart: ✅ only when exact, 🟡 when one off."""
    exercise = "timeline_request_count"
    spans = _spans(request_spans)
    if window is not None:
        w_start, w_end = sorted(map(float, window))
        spans = [(s, e) for s, e in spans if s < w_end and e > w_start]
    expected = len(spans)
    value = _number(exercise, answer)
    if isinstance(value, CheckResult):
        return _finish(value)
    where = f" between t = {w_start:g} s and {w_end:g} s" if window is not None else ""
    if value == expected:
        return _finish(_result(exercise, "correct", f"correct — {expected} requests ran{where}.",
                               answer, expected))
    off = value - expected
    status = "close" if abs(off) <= 1 else "wrong"
    return _finish(_result(
        exercise, status, f"{'close' if status == 'close' else 'not yet'} — {value:g} is "
        f"{abs(off):g} too {'many' if off > 0 else 'few'} (a whole number of requests: ✅ only "
        f"when exact, 🟡 when one off). Hint: count every bar{where}, including those that "
        "start before or end after the window; bars that touch are separate requests.",
        answer, expected))


def timeline_idle_gap(answer, request_spans: Sequence[tuple[float, float]],
                      min_overlap: float = 0.6) -> CheckResult:
    """The longest interval with no request running, read off a timeline, as (start, end) in s.
    ✅ when it overlaps the true gap by ≥ `min_overlap` of the span the two cover together
    (intersection over union), 🟡 when it overlaps it less, ❌ when it does not overlap it."""
    exercise = "timeline_idle_gap"
    gaps = idle_intervals(_spans(request_spans))
    if not gaps:
        raise ValueError("the timeline has no idle interval between requests")
    expected = max(gaps, key=lambda g: g[1] - g[0])
    if answer is None or answer is Ellipsis:
        return _finish(_unanswered(exercise))
    interval = None if isinstance(answer, (str, bytes)) else _interval(answer)
    if interval is None:
        return _finish(_result(exercise, "invalid", "expected an interval (start_s, end_s) of "
                               f"two numbers, e.g. (3.2, 4.0); got {answer!r}.", answer))
    start, end = interval
    iou = _overlap(interval, expected) / (max(end, expected[1]) - min(start, expected[0]))
    shown = f"({start:g}, {end:g}) s"
    rule = (f"✅ from an overlap of {min_overlap:.0%} of the span the two intervals cover, "
            "🟡 below that")
    if iou >= min_overlap:
        return _finish(_result(exercise, "correct", f"correct — {shown} matches the longest "
                               f"idle gap, ({expected[0]:.2f}, {expected[1]:.2f}) s (overlap "
                               f"{iou:.0%}, ✅ from {min_overlap:.0%}).", answer, expected))
    other = max(gaps, key=lambda g: _overlap(interval, g))
    if _overlap(interval, other) > 0 and other != expected:
        return _finish(_result(exercise, "wrong", f"not yet — {shown} is an idle gap, but not "
                               "the longest one. Hint: compare the widths of all the gaps "
                               "between bars.", answer, expected))
    if _overlap(interval, expected) > 0:
        return _finish(_result(
            exercise, "close", f"close — {shown} overlaps the gap by {iou:.0%} ({rule}): its "
            f"start is {start - expected[0]:+.2f} s and its end {end - expected[1]:+.2f} s off. "
            "Hint: the gap runs from the end of one bar to the start of the next.",
            answer, expected))
    return _finish(_result(exercise, "wrong", f"not yet — {shown} does not overlap any idle "
                           f"gap ({rule}). Hint: look for the widest stretch with no bar.",
                           answer, expected))


def idle_intervals(spans: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Gaps between busy periods (overlapping spans merged), from the first start to last end."""
    from labkit.measure.plots import merge_spans

    merged = merge_spans(spans)
    return [(a[1], b[0]) for a, b in zip(merged, merged[1:], strict=False)]


def _spans(request_spans) -> list[tuple[float, float]]:
    spans = [_interval(span) for span in request_spans]
    if not spans or any(span is None for span in spans):
        raise ValueError("request_spans must be a non-empty list of (start_s, end_s) pairs "
                         "with start ≤ end")
    return spans  # type: ignore[return-value]


def _interval(value) -> tuple[float, float] | None:
    try:
        start, end = (float(x) for x in value)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(start) and math.isfinite(end)) or end < start:
        return None
    return start, end


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
