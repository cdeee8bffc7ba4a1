"""Exercise checkers: each one recomputes the reference answer with labkit and tells the learner
whether theirs is right, how far off it is, and a hint.

Every checker takes the learner's answer first, then the inputs the answer was computed from
(a model shape, or the measured numbers), prints one line and returns a `CheckResult`. The line
starts with one of the marks in `MARKS`, the key every exercise notebook and exercises/README.md
show (tests/test_answer_marks.py holds them to it):

    ✅ right · 🟡 close (how far off, and the tolerance) · ❌ not yet (how far off, and a hint) ·
    ✏️ not answered yet · ⚠️ not a usable answer (e.g. text where a number goes)

and states the bands it was judged by. A number (memory, a time, a rate) is ✅ within its
checker's tolerance and 🟡 within `CLOSE_FACTOR` times it. A count that comes whole (pages,
servers) is ✅ only when exact and 🟡 when only the rounding is off (rounded the other way, at
another step, or not at all). A choice among measured rows is ✅ only for the right row; its 🟡
band is stated by its checker. An answer that matches a known mistake gets that mistake's
explanation instead of the general hint, 🟡 or ❌ by the same bands.

Checkers never raise on the learner's answer. Inputs that the exercise itself supplies (a shape,
measured numbers) are validated and raise ValueError when they cannot give a reference.
With LABKIT_CHECK_STRICT=1 (the solution notebooks in CI) anything but ✅ raises
`ExerciseNotPassed`, so a wrong solution fails the notebook run.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from labkit.engine import memory, synthetic
from labkit.measure.utilization import IDLE_THRESHOLD_PCT

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


# --- 01 memory -------------------------------------------------------------------------------

def parameter_count(answer, shape: str) -> CheckResult:
    """Parameters of the model `shape` (e.g. "llama-3.2-3b"), counted from its config."""
    config = _config(shape)
    expected = memory.parameter_count_from_config(config)
    embed = config.vocab_size * config.hidden_size
    mistakes = [(expected + embed, "The LM head shares its weights with the embeddings "
                 "(tie_word_embeddings=True): count that matrix once.")
                if config.tie_word_embeddings else
                (expected - embed, "This model has a separate LM head (tie_word_embeddings="
                 "False): count vocab_size × hidden_size twice."),
                (_count_with_full_kv_heads(config), "K and V projections have "
                 "num_key_value_heads × head_dim outputs (grouped-query attention), "
                 "not num_attention_heads × head_dim.")]
    return _finish(_compare(
        "parameter_count", answer, expected, unit="parameters", rel_tol=0.01, mistakes=mistakes,
        hint="embeddings (vocab × hidden) + per layer: q, k, v, o projections, the MLP's gate, "
             "up and down (3 × hidden × intermediate), two norms (hidden each); a final norm; "
             "an LM head only if it is not tied."))


def _count_with_full_kv_heads(config) -> int:
    full = copy.deepcopy(config)
    full.num_key_value_heads = config.num_attention_heads
    return memory.parameter_count_from_config(full)


def weight_memory(answer, shape: str, dtype="bfloat16", unit: str = "GB") -> CheckResult:
    """Memory of the weights of `shape` in `dtype`, in `unit` (GB = 10^9 bytes by default)."""
    config = _config(shape)
    params = memory.parameter_count_from_config(config)
    per = _dtype_bytes(dtype)
    scale = _unit(unit)
    n_bytes = params * per
    mistakes = [
        (params * 4 / scale, f"That is 4 bytes per parameter (float32); {dtype} has {per}."),
        (params * 2 / scale, f"That is 2 bytes per parameter; {dtype} has {per}."),
        (params / scale, f"That is 1 byte per parameter; {dtype} has {per} bytes per element."),
        (n_bytes * 8 / scale, "That is bits, not bytes: one byte is 8 bits."),
        (params / 1e9, "That is the parameter count in billions; multiply by the bytes per "
                       "parameter to get memory."),
        *_gib_mixup(n_bytes, unit),
    ]
    return _finish(_compare(
        "weight_memory", answer, n_bytes / scale, unit=unit, rel_tol=0.02, mistakes=mistakes,
        hint="parameters × bytes per parameter (bfloat16/float16: 2, float32: 4); count the "
             "parameters from the config (tied embeddings once)."))


def kv_cache_size(answer, shape: str, context_tokens: int, batch_size: int = 1,
                  dtype="bfloat16", unit: str = "GB") -> CheckResult:
    """KV-cache memory of `shape` for `batch_size` sequences of `context_tokens` tokens."""
    import torch

    from labkit.engine.model import resolve_dtype

    config = _config(shape)
    tokens = _count("context_tokens", context_tokens)
    batch = _count("batch_size", batch_size)
    _dtype_bytes(dtype)  # validates dtype with a clear message
    torch_dtype = resolve_dtype(dtype, torch.device("cpu"))
    scale = _unit(unit)
    n_bytes = memory.kv_cache_bytes(config, torch_dtype, batch, tokens)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    mistakes = [
        (n_bytes / 2 / scale, "Count both K and V: the cache stores two tensors per layer."),
        (n_bytes / config.num_hidden_layers / scale, "Every layer keeps its own K and V: "
                                                     "multiply by num_hidden_layers."),
        (n_bytes * heads / kv_heads / scale, "Grouped-query attention: the cache holds "
         f"num_key_value_heads ({kv_heads}) heads, not num_attention_heads ({heads})."),
        *_gib_mixup(n_bytes, unit),
    ]
    if batch > 1:
        mistakes.append((n_bytes / batch / scale, f"Each of the {batch} sequences has its own "
                                                  "cache: multiply by the batch size."))
    return _finish(_compare(
        "kv_cache_size", answer, n_bytes / scale, unit=unit, rel_tol=0.02, mistakes=mistakes,
        hint="2 (K and V) × layers × kv_heads × head_dim × bytes per element, per token; "
             "then × tokens × batch size."))


# --- 02 timing -------------------------------------------------------------------------------

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


# --- 04 queueing -----------------------------------------------------------------------------

def p95_latency(answer, latencies_ms: Iterable[float | None]) -> CheckResult:
    """95th percentile of measured latencies (numpy's linear interpolation). Failed requests,
    given as None or NaN, are left out, as ARCHITECTURE.md's metric definitions say."""
    from labkit.measure.loadstats import percentiles

    values = _finite_values("latencies_ms", latencies_ms)
    expected = percentiles(values, (95,))["p95"]
    mistakes = [(float(np.mean(values)), "That is the mean; p95 is the latency that 95 % of "
                                         "requests beat."),
                (float(np.median(values)), "That is the median (p50)."),
                (float(np.max(values)), "That is the maximum; p95 interpolates below it.")]
    for method in ("nearest", "lower", "higher", "inverted_cdf", "closest_observation"):
        mistakes.append((float(np.percentile(values, 95, method=method)),
                         f"That is the {method!r} percentile definition; the course uses "
                         "linear interpolation (numpy's default, np.percentile(x, 95))."))
    return _finish(_compare(
        "p95_latency", answer, expected, unit="ms", rel_tol=0.002, mistakes=mistakes,
        hint="np.percentile(latencies, 95) over the successful requests only."))


def _finite_values(name: str, values: Iterable[float | None]) -> np.ndarray:
    kept = np.array([float(v) for v in values if v is not None], dtype=float)
    kept = kept[np.isfinite(kept)]
    if kept.size == 0:
        raise ValueError(f"{name} holds no finite values")
    return kept


def littles_law_throughput(answer, single_request_latency_s: float,
                           concurrency: int) -> CheckResult:
    """Requests/s a one-at-a-time server reaches at `concurrency`: still 1 / service time."""
    service = _positive("single_request_latency_s", single_request_latency_s)
    n = _count("concurrency", concurrency)
    expected = 1 / service
    mistakes = [(expected * 60, "That is requests per minute; give requests per second."),
                (service, "That is seconds per request; throughput is its inverse.")]
    if n > 1:
        mistakes.append((n / service, f"That assumes the {n} requests run in parallel. This "
                         "server generates one request at a time: more clients only queue."))
    return _finish(_compare(
        "littles_law_throughput", answer, expected, unit="requests/s", rel_tol=0.02,
        mistakes=mistakes,
        hint="a sequential server finishes one request per service time, whatever the "
             "concurrency: throughput = 1 / latency of one request."))


def littles_law_latency(answer, single_request_latency_s: float, concurrency: int) -> CheckResult:
    """Latency each client sees with `concurrency` requests always in flight: W = N / λ = N × S."""
    service = _positive("single_request_latency_s", single_request_latency_s)
    n = _count("concurrency", concurrency)
    expected = n * service
    mistakes = [(expected * 1000, "That is milliseconds; give seconds."),
                ((n + 1) / 2 * service, "That is the mean for one burst of N requests arriving "
                                        "together; with N always in flight, W = N / throughput.")]
    if n > 1:
        mistakes.append((service, "Latency does not stay flat: each request waits behind the "
                                  "others in the queue."))
    return _finish(_compare(
        "littles_law_latency", answer, expected, unit="s", rel_tol=0.05, mistakes=mistakes,
        hint="Little's law: requests in flight = throughput × latency, so latency = N ÷ "
             "throughput, with throughput = 1 / service time."))


# --- 05 utilization and cost -------------------------------------------------------------------

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


# --- 06 batching -----------------------------------------------------------------------------

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


# --- 07 sharing one GPU ------------------------------------------------------------------------

def _memory_line(rows, memory_key: str) -> tuple[float, dict, dict]:
    """(memory per extra server, the row with the fewest servers, the row with the most) of the
    sequential set-ups in `rows` (rows of `experiments.share_one_gpu`): the slope of memory
    between the fewest and the most servers measured."""
    table = _rows([r for r in rows if r.get("mode", "sequential") == "sequential"],
                  ("servers", memory_key))
    fewest = min(table, key=lambda r: r["servers"])
    most = max(table, key=lambda r: r["servers"])
    if most["servers"] == fewest["servers"]:
        raise ValueError("measure at least two different server counts")
    slope = (most[memory_key] - fewest[memory_key]) / (most["servers"] - fewest["servers"])
    if not slope > 0:
        raise ValueError(f"{memory_key} did not grow with the server count; measure again")
    return slope, fewest, most


def memory_per_server(answer, rows, memory_key: str = "gpu_memory_used_gb") -> CheckResult:
    """GB each extra server process adds: the slope of memory against the server count."""
    slope, _, most = _memory_line(rows, memory_key)
    mistakes = [(most[memory_key] / most["servers"], "That divides everything in use by the "
                 "server count, including memory that was in use without any of them; take "
                 "the difference between two set-ups instead.")]
    return _finish(_compare(
        "memory_per_server", answer, slope, unit="GB", rel_tol=0.02, mistakes=mistakes,
        hint="(memory with the most servers − memory with the fewest) ÷ (the difference in "
             "server count)."))


def servers_that_fit(answer, rows, capacity_gb: float,
                     memory_key: str = "gpu_memory_used_gb") -> CheckResult:
    """How many server processes fit in `capacity_gb`, each extra one adding the measured
    memory per server to the smallest set-up's. A whole number: ✅ only when exact, 🟡 when only
    the rounding is off."""
    exercise = "servers_that_fit"
    capacity = _positive("capacity_gb", capacity_gb)
    slope, fewest, _ = _memory_line(rows, memory_key)
    servers, used = fewest["servers"], fewest[memory_key]
    if used > capacity:
        raise ValueError(f"the smallest set-up already uses {used:g} GB of {capacity:g} GB")
    expected = int(servers + math.floor((capacity - used) / slope + 1e-9))  # 1e-9: float noise
    rounding = [(expected + 1, "one too many; round down, as a server that does not fully "
                               "fit cannot start")]
    mistakes = [(math.floor(capacity / slope + 1e-9), "That ignores what the first set-up "
                 "already holds beyond one server's share; start from its measured memory and "
                 "add servers until the capacity is reached.")]
    return _finish(_whole(exercise, answer, expected, noun="servers", rounds="down",
                          rounding=rounding, mistakes=mistakes,
                          hint="start from the smallest set-up's memory and add one server's "
                               "memory at a time: servers + (capacity − memory) ÷ memory per "
                               "server, rounded down."))


def servers_to_match(answer, rows) -> CheckResult:
    """Sequential servers needed to match the batched server's throughput, if each added one
    lone server's throughput (the best case): ceil(batched req/s ÷ one server's req/s).
    A whole number: ✅ only when exact, 🟡 when only the rounding is off."""
    exercise = "servers_to_match"
    table = _rows(rows, ("servers", "requests_per_second"))
    single = [r for r in table if r.get("mode") == "sequential" and r["servers"] == 1]
    batched = [r for r in table if r.get("mode") == "batched"]
    if not single or not batched:
        raise ValueError("rows need a one-server sequential set-up and a batched one")
    ratio = batched[0]["requests_per_second"] / single[0]["requests_per_second"]
    expected = math.ceil(ratio - 1e-9)
    rounding = [(math.floor(ratio + 1e-9), "one too few; round up, as a fraction of a server "
                                           "cannot run")]
    mistakes = [(math.ceil(1 / ratio - 1e-9), "That is one server's requests/s over the "
                 "batched server's: divide the other way round.")]
    return _finish(_whole(exercise, answer, expected, noun="servers", rounds="up",
                          rounding=rounding, mistakes=mistakes,
                          hint="divide the batched server's requests/s by one sequential "
                               "server's, and round up."))


# --- 08 continuous batching ------------------------------------------------------------------

def _pages_per_request(prompt_tokens: int, output_tokens: int, page_tokens: int) -> int:
    tokens = _count("prompt_tokens", prompt_tokens) + _count("output_tokens", output_tokens)
    return math.ceil(tokens / _count("page_tokens", page_tokens))


def kv_pages_needed(answer, requests: int, prompt_tokens: int, output_tokens: int,
                    page_tokens: int = 16) -> CheckResult:
    """KV cache pages `requests` requests of `prompt_tokens` + `output_tokens` tokens hold at
    once, at `page_tokens` tokens per page: each request rounds up to whole pages of its own.
    A whole number: ✅ only when exact, 🟡 when only the rounding is off."""
    n = _count("requests", requests)
    per_request = _pages_per_request(prompt_tokens, output_tokens, page_tokens)
    tokens = prompt_tokens + output_tokens
    rounding = [
        (n * (tokens // page_tokens), "rounded down; round up, as a request with a few tokens "
                                      "left over still takes a whole page for them"),
        (math.ceil(n * tokens / page_tokens), "that rounds the tokens of all requests "
         "together; each request has pages of its own, so round up per request, then multiply"),
        (n * tokens / page_tokens, "pages come whole; round up the pages of each request, then "
                                   "multiply"),
    ]
    mistakes = [(n * math.ceil(output_tokens / page_tokens), "The prompt's tokens are in the "
                 "cache too: count prompt + output tokens.")]
    return _finish(_whole("kv_pages_needed", answer, n * per_request, noun="pages", rounds=None,
                          rounding=rounding, mistakes=mistakes,
                          hint="pages per request = ceil((prompt + output tokens) ÷ tokens per "
                               "page); then × the number of requests."))


def kv_pages_in_memory(answer, cache_gb: float, shape: str, dtype="bfloat16",
                       page_tokens: int = 16) -> CheckResult:
    """Whole KV cache pages of `page_tokens` tokens that `cache_gb` GB (10^9 bytes) hold for the
    model `shape` in `dtype`: a page is page_tokens × `labkit.engine.kv_cache.bytes_per_token`
    (what `labkit serve --mode continuous --kv-cache-gb` sizes its cache with). A whole number:
    ✅ only when exact, 🟡 when only the rounding is off."""
    import torch

    from labkit.engine.kv_cache import bytes_per_token
    from labkit.engine.model import resolve_dtype

    config = _config(shape)
    memory = _positive("cache_gb", cache_gb) * 1e9
    tokens = _count("page_tokens", page_tokens)
    _dtype_bytes(dtype)  # validates dtype with a clear message
    page_bytes = tokens * bytes_per_token(config, resolve_dtype(dtype, torch.device("cpu")))
    expected = int(memory // page_bytes)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    rounding = [(expected + 1, "one too many; round down, as a page that does not fully fit "
                               "is not there")]
    mistakes = [
        (int(2 * memory // page_bytes), "Count both K and V: every token stores a key and a "
                                        "value in each layer."),
        (int(config.num_hidden_layers * memory // page_bytes), "Every layer keeps its own K and "
                                                               "V: multiply by the layers."),
        (int(kv_heads * memory // (heads * page_bytes)), "Grouped-query attention: the cache "
         f"holds num_key_value_heads ({kv_heads}) heads, not num_attention_heads ({heads})."),
        (int(tokens * memory // page_bytes), f"That counts tokens: a page holds {tokens} of "
                                             "them."),
        (int(2**30 * memory / 1e9 // page_bytes), "That reads GB as GiB: 1 GB = 10^9 bytes."),
    ]
    return _finish(_whole("kv_pages_in_memory", answer, expected, noun="pages", rounds="down",
                          rounding=rounding, mistakes=mistakes,
                          hint="bytes per token = 2 (K and V) × layers × kv_heads × head_dim × "
                               "bytes per element; a page is that × tokens per page; the cache's "
                               "bytes ÷ a page's, rounded down."))


def requests_that_fit(answer, kv_pages_total: int, prompt_tokens: int, output_tokens: int,
                      page_tokens: int = 16) -> CheckResult:
    """How many requests of `prompt_tokens` + `output_tokens` tokens a cache of `kv_pages_total`
    pages holds at once, each in whole pages of its own (after that, a request waits, or one
    running is preempted). A whole number: ✅ only when exact, 🟡 when only the rounding is
    off."""
    total = _count("kv_pages_total", kv_pages_total)
    per_request = _pages_per_request(prompt_tokens, output_tokens, page_tokens)
    tokens = prompt_tokens + output_tokens
    per_page = "a request's last page is whole even when it is partly empty, so round the " \
               "pages of one request up, then divide, then round down"
    rounding = [
        (math.ceil(total / per_request), "one too many; round down, as a request that does "
                                         "not fully fit cannot run"),
        (total * page_tokens // tokens, f"that divides by a request's tokens, not its pages; "
                                        f"{per_page}"),
        (total * page_tokens / tokens, f"that divides by a request's tokens, not its pages; "
                                       f"{per_page}"),
    ]
    return _finish(_whole("requests_that_fit", answer, total // per_request, noun="requests",
                          rounds="down", rounding=rounding,
                          hint="pages of one request = ceil((prompt + output) ÷ tokens per page); "
                               "total pages ÷ that, rounded down."))


def rate_where_ttft_passes(answer, rows, target_ms: float, *, rate_key: str = "rate",
                           ttft_key: str = "ttft_p95_ms",
                           served_key: str = "requests_per_second") -> CheckResult:
    """The lowest measured arrival rate whose p95 TTFT is over `target_ms`. `rows`: a list of
    mappings (or a DataFrame) with the rate and its measured p95 TTFT (and, if measured, the
    served rate under `served_key`). A choice among the measured rates: ✅ only for that one,
    exactly; 🟡 for a number within CHOICE_CLOSE of it that no other measured rate is nearer
    (a rounded reading, or the served rate read instead of the arrival rate)."""
    exercise = "rate_where_ttft_passes"
    target = _positive("target_ms", target_ms)
    table = sorted(_rows(rows, (rate_key, ttft_key)), key=lambda r: r[rate_key])
    over = [r for r in table if r[ttft_key] > target]
    if not over:
        raise ValueError(f"no measured rate has p95 TTFT over {target:g} ms; choose a target "
                         "under the highest measured p95 TTFT, or measure higher rates")
    expected = over[0][rate_key]
    value = _number(exercise, answer)
    if isinstance(value, CheckResult):
        return _finish(value)
    if value == expected:
        return _finish(_result(
            exercise, "correct", f"correct — at {value:g} req/s p95 TTFT was "
            f"{over[0][ttft_key]:.4g} ms, over the {target:g} ms target.", answer, expected))
    rates = [r[rate_key] for r in table]
    rule = (f"one of the measured rates: ✅ for the right one exactly, 🟡 within "
            f"±{_percent(CHOICE_CLOSE)} of it")
    served = [_float_or_none(r.get(served_key)) for r in table]
    why = (f" That is a served rate ({served_key}); the question asks for the arrival rate, "
           f"the {rate_key!r} column." if any(
               x is not None and math.isclose(value, x, rel_tol=1e-3) for x in served) else "")
    if value not in rates:
        nearest = min(rates, key=lambda r: abs(r - value))
        if nearest == expected and abs(value - expected) <= CHOICE_CLOSE * expected:
            return _finish(_result(
                exercise, "close", f"close — {value:g} req/s is {_how_far(value, expected)}, "
                f"not a measured rate ({rule}).{why} Hint: give the rate exactly as measured, "
                f"from the {rate_key!r} column.", answer, expected))
        wrong = _choice(exercise, value, rates, "rates", rule, answer, expected)
        return _finish(dataclasses.replace(wrong, message=wrong.message + why))
    chosen = next(r for r in table if r[rate_key] == value)
    if chosen[ttft_key] <= target:
        hint = (f"at {value:g} req/s p95 TTFT was {chosen[ttft_key]:.4g} ms, within the target; "
                "the question asks for the first rate that goes over it.")
    else:
        hint = ("that rate is over the target, but a lower measured rate already was: take the "
                "lowest rate whose p95 TTFT is over the target.")
    return _finish(_result(exercise, "wrong", f"not yet — {value:g} req/s ({rule}): {hint}",
                           answer, expected))


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
