"""What every checker shares: the marks and their key, `CheckResult`, the bands a number or a
whole count is judged by, and the checks of the inputs an exercise supplies."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from labkit.engine import memory, synthetic

STRICT_ENV = "LABKIT_CHECK_STRICT"
UNITS = {"bytes": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}

# Verdict -> (the mark its line starts with, what the mark tells the learner). MARKS_KEY is the
# key learners read, in every exercise notebook's first cell and in exercises/README.md.
MARKS: dict[str, tuple[str, str]] = {
    "correct": ("✅", "right"),
    "close": ("🟡", "close (how far off, and the tolerance)"),
    "wrong": ("❌", "not yet (how far off, and a hint)"),
    "unanswered": ("✏️", "not answered yet"),
    "invalid": ("⚠️", "not a usable answer (e.g. text where a number goes)"),
}
MARKS_KEY = " · ".join(f"{mark} {meaning}" for mark, meaning in MARKS.values())
CLOSE_FACTOR = 5  # a number is 🟡 within this many times its ✅ tolerance
CHOICE_CLOSE = 0.05  # 🟡 band of the choices among measured rows (see their checkers)

# Exercise name -> exercise set (the course notebook it belongs to).
EXERCISES: dict[str, str] = {
    "parameter_count": "01_memory",
    "weight_memory": "01_memory",
    "kv_cache_size": "01_memory",
    "ms_per_token": "02_timing",
    "time_per_output_token": "02_timing",
    "bandwidth_floor": "02_timing",
    "fp8_floor": "02_timing",
    "p95_latency": "04_queueing",
    "littles_law_throughput": "04_queueing",
    "littles_law_latency": "04_queueing",
    "idle_percent": "05_utilization_cost",
    "effective_cost": "05_utilization_cost",
    "timeline_request_count": "05_utilization_cost",
    "timeline_idle_gap": "05_utilization_cost",
    "best_batch_size": "06_batching",
    "memory_per_server": "07_sharing",
    "servers_that_fit": "07_sharing",
    "servers_to_match": "07_sharing",
    "kv_pages_needed": "08_continuous_batching",
    "kv_pages_in_memory": "08_continuous_batching",
    "requests_that_fit": "08_continuous_batching",
    "rate_where_ttft_passes": "08_continuous_batching",
    "knee_concurrency": "09_cost_frontier",
    "highest_concurrency_meeting_slo": "09_cost_frontier",
    "cost_per_million_tokens": "09_cost_frontier",
    "gpus_for_traffic": "09_cost_frontier",
    "monthly_gpu_cost": "09_cost_frontier",
}


class ExerciseNotPassed(AssertionError):
    """Raised in strict mode (LABKIT_CHECK_STRICT=1) when a checker's verdict is not ✅."""


@dataclasses.dataclass(frozen=True)
class CheckResult:
    exercise: str
    status: str  # a key of MARKS: "correct", "close", "wrong", "unanswered" or "invalid"
    message: str
    answer: object = None
    expected: object = None

    @property
    def correct(self) -> bool:
        return self.status == "correct"

    @property
    def mark(self) -> str:
        return MARKS[self.status][0]

    def __bool__(self) -> bool:
        return self.correct

    def __str__(self) -> str:
        return self.message

    def _ipython_display_(self) -> None:
        """The checker already printed the message; show it once when the call ends a cell."""


# --- verdict helpers -------------------------------------------------------------------------

def _result(exercise: str, status: str, text: str, answer: object = None,
            expected: object = None) -> CheckResult:
    """The verdict `status`, its line starting with the mark MARKS gives that status."""
    return CheckResult(exercise, status, f"{MARKS[status][0]} {exercise}: {text}", answer,
                       expected)


def _finish(result: CheckResult) -> CheckResult:
    print(result.message)
    if os.environ.get(STRICT_ENV, "") not in ("", "0") and not result.correct:
        raise ExerciseNotPassed(result.message)
    return result


def _unanswered(exercise: str) -> CheckResult:
    return _result(exercise, "unanswered", "not answered yet — replace the `None` (or `...`) "
                   "with your answer and run the cell again.")


def _number(exercise: str, answer: object) -> float | CheckResult:
    """The answer as a float, or the verdict for a stub / an unusable answer."""
    if answer is None or answer is Ellipsis:
        return _unanswered(exercise)
    if isinstance(answer, (str, bytes, bool)):
        return _result(exercise, "invalid", f"expected a number, got {answer!r}. Give the value "
                       "itself, e.g. 6.43, not text.", answer)
    try:
        value = float(answer)  # ints, floats, numpy and one-element torch scalars
    except (TypeError, ValueError):
        return _result(exercise, "invalid", f"expected a single number, got "
                       f"{type(answer).__name__} {answer!r}.", answer)
    if not math.isfinite(value):
        return _result(exercise, "invalid", f"got {value}; the answer must be a finite number "
                       "(a division by zero somewhere?).", answer)
    return value


def _how_far(value: float, expected: float, unit: str | None = None) -> str:
    """How far `value` is from the reference: relative, or in `unit` when one is given (the
    checkers with an absolute tolerance)."""
    if unit is not None or expected == 0:
        diff = value - expected
        return (f"{abs(diff):.3g} {_unit_name(unit or '')} {'above' if diff > 0 else 'below'} "
                "the reference").replace("  ", " ")
    ratio = value / expected
    if ratio >= 2 or 0 < ratio <= 0.5:
        return f"about {ratio:.3g}× the reference" if ratio > 1 else \
            f"about 1/{1 / ratio:.3g} of the reference"
    if ratio <= 0:
        return "of the opposite sign to the reference"
    return f"{abs(ratio - 1):.1%} {'above' if ratio > 1 else 'below'} the reference"


def _unit_name(unit: str) -> str:
    return "percentage points" if unit == "%" else unit


def _percent(fraction: float) -> str:
    return f"{round(100 * fraction, 6):g}%"


def _bands(rel_tol: float, abs_tol: float, unit: str) -> tuple[str, str]:
    """The ✅ tolerance and the 🟡 band of a number, as its messages state them."""
    if rel_tol:
        return f"±{_percent(rel_tol)}", f"±{_percent(CLOSE_FACTOR * rel_tol)}"
    name = _unit_name(unit)
    return f"±{abs_tol:g} {name}".rstrip(), f"±{CLOSE_FACTOR * abs_tol:g} {name}".rstrip()


def _compare(exercise: str, answer: object, expected: float, *, unit: str, hint: str,
             rel_tol: float = 0.0, abs_tol: float = 0.0,
             mistakes: Iterable[tuple[float, str]] = ()) -> CheckResult:
    """Numeric verdict, with a tolerance relative to the reference (`rel_tol`) or in the
    answer's unit (`abs_tol`): ✅ within it, 🟡 within CLOSE_FACTOR times it, ❌ beyond; every
    message states both bands. An answer at a known mistake (within the tolerance of the
    mistake's value) gets its explanation instead of the hint. Only ✅ shows the reference."""
    if (rel_tol > 0) == (abs_tol > 0):
        raise ValueError("give a checker either rel_tol or abs_tol")
    value = _number(exercise, answer)
    if isinstance(value, CheckResult):
        return value

    def tolerance(ref: float) -> float:
        return rel_tol * abs(ref) if rel_tol else abs_tol

    right, close = _bands(rel_tol, abs_tol, unit)
    shown = f"{value:.4g} {unit}".rstrip()
    off = abs(value - expected)
    if off <= tolerance(expected):
        return _result(exercise, "correct", f"correct — {shown} (reference {expected:.4g} "
                       f"{unit}, within {right}).".replace(" ,", ","), answer, expected)
    why = next((explanation for wrong_value, explanation in mistakes
                if abs(value - wrong_value) <= tolerance(wrong_value)
                and abs(wrong_value - expected) > tolerance(expected)), f"Hint: {hint}")
    status = "close" if off <= CLOSE_FACTOR * tolerance(expected) else "wrong"
    far = _how_far(value, expected, None if rel_tol else unit)
    return _result(exercise, status, f"{'close' if status == 'close' else 'not yet'} — {shown} "
                   f"is {far} (✅ within {right}, 🟡 within {close}). {why}", answer, expected)


def _whole(exercise: str, answer: object, expected: int, *, noun: str, hint: str,
           rounds: str | None, rounding: Iterable[tuple[float, str]] = (),
           mistakes: Iterable[tuple[float, str]] = ()) -> CheckResult:
    """A count that comes whole: ✅ only when exact; 🟡 when only the rounding is off: a
    fraction that rounding `rounds` ("down" or "up") turns into the reference, or one of
    `rounding` (the reference rounded the other way or at another step; a fractional entry is
    the value before rounding, matched within 0.05, a one-decimal reading of it); ❌ otherwise,
    with a known mistake's explanation if the answer is one."""
    value = _number(exercise, answer)
    if isinstance(value, CheckResult):
        return value
    rule = f"a whole number of {noun}: ✅ only when exact, 🟡 when only the rounding is off"
    shown = f"{value:g} {noun}"
    if value == expected:
        return _result(exercise, "correct", f"correct — {expected:g} {noun}.", answer, expected)
    fraction = not value.is_integer()
    mistaken = [why for wrong, why in mistakes if wrong != expected and value == wrong]
    for near, why in rounding:
        if near == expected:
            continue
        if value == near or (fraction and not float(near).is_integer()
                             and abs(value - near) <= 0.05):
            also = f" Or, if that is not it: {mistaken[0]}" if mistaken else ""
            return _result(exercise, "close", f"close — {shown}: {why} ({rule}).{also}",
                           answer, expected)
    rounded = {"down": math.floor, "up": math.ceil}[rounds](value) if rounds and fraction \
        else None
    if rounded == expected:
        return _result(exercise, "close", f"close — {shown} is not a whole number: round it "
                       f"{rounds} ({rule}).", answer, expected)
    why = mistaken[0] if mistaken else f"Hint: {hint}"
    return _result(exercise, "wrong", f"not yet — {shown} is {_how_far(value, expected)} "
                   f"({rule}). {why}", answer, expected)


def _choice(exercise: str, value: float, measured: list[float], what: str, rule: str,
            answer: object, expected: object) -> CheckResult | None:
    """A "wrong" result when `value` is none of the `measured` values of the table, else None.
    `rule`: the checker's bands, which the message states."""
    if value in measured:
        return None
    listed = ", ".join(f"{m:g}" for m in measured)
    return _result(exercise, "wrong", f"not yet — {value:g} is not one of the measured {what}: "
                   f"{listed} ({rule}).", answer, expected)


# --- inputs the exercise supplies --------------------------------------------------------------

def _config(shape: str):
    name = shape.removeprefix(synthetic.PREFIX)
    if name not in synthetic.SHAPES:
        raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(synthetic.SHAPES)}")
    return synthetic.synthetic_config(name)


def _dtype_bytes(dtype) -> int:
    import torch

    from labkit.engine.model import resolve_dtype

    if dtype == "auto":
        raise ValueError("give an explicit dtype (bfloat16, float16, float32), not 'auto'")
    return memory.dtype_bytes(resolve_dtype(dtype, torch.device("cpu")))


def _unit(unit: str) -> float:
    if unit not in UNITS:
        raise ValueError(f"unit {unit!r}: use one of {', '.join(UNITS)}")
    return UNITS[unit]


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value


def _count(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return int(value)


def _gib_mixup(n_bytes: float, unit: str) -> list[tuple[float, str]]:
    """GB and GiB differ by 7 %: the classic unit slip, in whichever direction applies."""
    twins = {"GB": "GiB", "GiB": "GB", "MB": "MiB", "MiB": "MB", "KB": "KiB", "KiB": "KB"}
    if unit not in twins:
        return []
    return [(n_bytes / UNITS[twins[unit]], f"That is the size in {twins[unit]}; the question "
             f"asks for {unit} (1 GB = 10^9 bytes, 1 GiB = 2^30 bytes).")]



def _float_or_none(value) -> float | None:
    try:
        return None if value is None or isinstance(value, (str, bool)) else float(value)
    except (TypeError, ValueError):
        return None


def _rows(rows, keys: Sequence[str]) -> list[dict]:
    if hasattr(rows, "to_dict"):  # a pandas DataFrame
        rows = rows.to_dict("records")
    table = [dict(r) for r in rows if isinstance(r, Mapping)]
    if not table or len(table) != len(rows):
        raise ValueError("rows must be a non-empty list of mappings (or a DataFrame)")
    for r in table:
        missing = [k for k in keys if k not in r]
        if missing:
            raise ValueError(f"row {r} lacks {', '.join(missing)}; pass the key names used")
        for k in keys:
            r[k] = float(r[k])
    return table

def _finite_values(name: str, values: Iterable[float | None]) -> np.ndarray:
    kept = np.array([float(v) for v in values if v is not None], dtype=float)
    kept = kept[np.isfinite(kept)]
    if kept.size == 0:
        raise ValueError(f"{name} holds no finite values")
    return kept
