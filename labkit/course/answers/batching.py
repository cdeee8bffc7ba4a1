"""Exercise set 06 (batching): the batch size that meets a latency target."""

from __future__ import annotations

from labkit.course.answers.verdict import (
    CHOICE_CLOSE,
    CheckResult,
    _choice,
    _finish,
    _number,
    _percent,
    _positive,
    _result,
    _rows,
)


def best_batch_size(answer, rows, p95_target_ms: float, *, batch_key: str = "batch_size",
                    throughput_key: str = "throughput", p95_key: str = "p95_ms") -> CheckResult:
    """The batch size with the highest throughput among measured rows whose p95 meets the target.
    `rows`: a list of mappings (or a pandas DataFrame) with batch size, throughput and p95.
    A choice among the measured batch sizes: ✅ only for that one; 🟡 for another that meets the
    target with a throughput within CHOICE_CLOSE of the best (a near tie, e.g. in a rounded
    table); ❌ for one over the target, or further below the best."""
    exercise = "best_batch_size"
    target = _positive("p95_target_ms", p95_target_ms)
    table = _rows(rows, (batch_key, throughput_key, p95_key))
    meeting = [r for r in table if r[p95_key] <= target]
    if not meeting:
        raise ValueError(f"no measured batch size has p95 ≤ {target:g} ms; choose a target at or "
                         "above the smallest measured p95")
    best = max(meeting, key=lambda r: r[throughput_key])
    expected = best[batch_key]
    value = _number(exercise, answer)
    if isinstance(value, CheckResult):
        return _finish(value)
    rule = (f"one of the measured batch sizes: ✅ for the best under the target, 🟡 for one "
            f"under it within {_percent(CHOICE_CLOSE)} of its throughput")
    unmeasured = _choice(exercise, value, [r[batch_key] for r in table], "batch sizes", rule,
                         answer, expected)
    if unmeasured is not None:
        return _finish(unmeasured)
    chosen = next(r for r in table if r[batch_key] == value)
    if value == expected:
        return _finish(_result(
            exercise, "correct", f"correct — batch {value:g} gives "
            f"{chosen[throughput_key]:.4g} throughput at p95 {chosen[p95_key]:.4g} ms "
            f"(target {target:g} ms).", answer, expected))
    if chosen[p95_key] > target:
        return _finish(_result(
            exercise, "wrong", f"not yet — batch {value:g} has p95 {chosen[p95_key]:.4g} ms, "
            f"over the {target:g} ms target ({rule}). Hint: first drop the rows that miss the "
            "target.", answer, expected))
    short = 1 - chosen[throughput_key] / best[throughput_key]
    status = "close" if short <= CHOICE_CLOSE else "wrong"
    return _finish(_result(
        exercise, status, f"{'close' if status == 'close' else 'not yet'} — batch {value:g} "
        f"meets the target, but its throughput is {short:.1%} below that of another batch "
        f"size that meets it ({rule}). Hint: among the rows under the target, take the highest "
        "throughput.", answer, expected))
