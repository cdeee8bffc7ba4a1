"""benchmarks/engine.py's reading of a profiled step (the GPU runs are its own job)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from engine import step_timeline  # noqa: E402


def test_a_step_timeline_counts_what_each_overlapping_kernel_adds_by_its_role():
    """Two layers of 5 kernels then lm_head, twice; under PDL each kernel starts before the one
    before ends, so its marginal time (end after the latest end) is what it adds to the step."""
    step, t = [], 0.0
    for _ in range(2):
        for name, length in (("_gemv_kernel", 6.0), ("_decode_kernel", 4.0),
                             ("_gemv_kernel", 4.0), ("_gemv_kernel", 18.0),
                             ("_gemv_kernel", 10.0)):
            step.append((name, t, t + length + 2.0))  # started 2 µs early, waiting
            t += length
    step.append(("_gemv_kernel", t, t + 120.0))
    steps = step + [(name, start + 1000.0, end + 1000.0) for name, start, end in step]
    timeline = step_timeline(steps, layers=2, steps=2)
    assert list(timeline)[:2] == ["lm_head", "gate_up"]  # by marginal time, largest first
    assert timeline["lm_head"] == {"marginal_us": 118.0, "duration_us": 120.0, "launches": 1}
    assert timeline["gate_up"] == {"marginal_us": 36.0, "duration_us": 40.0, "launches": 2}
    assert timeline["qkv"]["marginal_us"] == 8.0 + 6.0  # the step's first kernel: all of it
    assert timeline["_decode_kernel"]["launches"] == 2
    assert sum(role["marginal_us"] for role in timeline.values()) == t + 120.0
