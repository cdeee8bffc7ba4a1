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

The checkers live in one module per exercise set (`model_memory` 01, `timing` 02, `queueing` 04,
`utilization_cost` 05, `batching` 06, `sharing` 07, `continuous_batching` 08, `cost_frontier`
09), over the marks, bands and input checks they share (`verdict`); every checker is importable
from here, as the exercise notebooks call it: `answers.kv_pages_needed(...)`.

Checkers never raise on the learner's answer. Inputs that the exercise itself supplies (a shape,
measured numbers) are validated and raise ValueError when they cannot give a reference.
With LABKIT_CHECK_STRICT=1 (the solution notebooks in CI) anything but ✅ raises
`ExerciseNotPassed`, so a wrong solution fails the notebook run.
"""

from __future__ import annotations

from labkit.course.answers.batching import (
    best_batch_size,
)
from labkit.course.answers.continuous_batching import (
    kv_pages_in_memory,
    kv_pages_needed,
    rate_where_ttft_passes,
    requests_that_fit,
)
from labkit.course.answers.cost_frontier import (
    cost_per_million_tokens,
    gpus_for_traffic,
    highest_concurrency_meeting_slo,
    knee_concurrency,
    monthly_gpu_cost,
)
from labkit.course.answers.model_memory import (
    kv_cache_size,
    parameter_count,
    weight_memory,
)
from labkit.course.answers.queueing import (
    littles_law_latency,
    littles_law_throughput,
    p95_latency,
)
from labkit.course.answers.sharing import (
    memory_per_server,
    servers_that_fit,
    servers_to_match,
)
from labkit.course.answers.timing import (
    bandwidth_floor,
    fp8_floor,
    ms_per_token,
    time_per_output_token,
)
from labkit.course.answers.utilization_cost import (
    effective_cost,
    idle_intervals,
    idle_percent,
    timeline_idle_gap,
    timeline_request_count,
)
from labkit.course.answers.verdict import (
    CLOSE_FACTOR,
    EXERCISES,
    MARKS,
    MARKS_KEY,
    STRICT_ENV,
    CheckResult,
    ExerciseNotPassed,
)

__all__ = ["CLOSE_FACTOR", "CheckResult", "EXERCISES", "ExerciseNotPassed", "MARKS", "MARKS_KEY",
           "STRICT_ENV", "bandwidth_floor", "best_batch_size", "cost_per_million_tokens",
           "effective_cost", "fp8_floor", "gpus_for_traffic", "highest_concurrency_meeting_slo",
           "idle_intervals", "idle_percent", "knee_concurrency", "kv_cache_size",
           "kv_pages_in_memory", "kv_pages_needed", "littles_law_latency",
           "littles_law_throughput", "memory_per_server", "monthly_gpu_cost", "ms_per_token",
           "p95_latency", "parameter_count", "rate_where_ttft_passes", "requests_that_fit",
           "servers_that_fit", "servers_to_match", "time_per_output_token", "timeline_idle_gap",
           "timeline_request_count", "weight_memory"]
