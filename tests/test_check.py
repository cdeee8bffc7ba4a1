"""labkit.course.answers: each checker says right / how far off / not answered; stubs never
crash it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from labkit.course import answers
from labkit.engine import memory, synthetic
from labkit.measure import cost

SPANS = [(0.0, 1.0), (1.2, 2.0), (4.0, 5.0), (5.1, 6.0)]  # longest gap: (2.0, 4.0)
ROWS = [
    {"batch_size": 1, "throughput": 10.0, "p95_ms": 100.0},
    {"batch_size": 4, "throughput": 30.0, "p95_ms": 200.0},
    {"batch_size": 8, "throughput": 50.0, "p95_ms": 400.0},
]
SHARED = [  # rows of experiments.share_one_gpu, as measured on the H100 (notebook 07)
    {"mode": "sequential", "servers": 1, "requests_per_second": 0.22, "gpu_memory_used_gb": 9.1},
    {"mode": "sequential", "servers": 2, "requests_per_second": 0.30, "gpu_memory_used_gb": 17.1},
    {"mode": "sequential", "servers": 4, "requests_per_second": 0.47, "gpu_memory_used_gb": 33.2},
    {"mode": "batched", "servers": 1, "requests_per_second": 11.06, "gpu_memory_used_gb": 13.1},
]
LATENCIES = [720.0, 800.0, 831.0, 850.0, 900.0, 1000.0, 1100.0, 1543.0]
RATES = [{"rate": 4.0, "ttft_p95_ms": 50.0}, {"rate": 16.0, "ttft_p95_ms": 90.0},
         {"rate": 64.0, "ttft_p95_ms": 400.0}, {"rate": 32.0, "ttft_p95_ms": 250.0}]
LONG = {"prompt_tokens": 12, "output_tokens": 512}  # 524 tokens: 33 pages of 16
# A measured frontier (notebook 09): the knee at 8 (560 x 70 = 39,200; 16 gives 37,800, 3.6 %
# below); under p95 TTFT <= 1,000 ms and >= 40 tok/s per user, the highest is 16.
FRONTIER = [
    {"concurrency": c, "output_tokens_per_sec": tok, "tokens_per_user": user, "ttft_p95_ms": ttft}
    for c, tok, user, ttft in [(1, 100.0, 100.0, 50.0), (2, 190.0, 95.0, 60.0),
                               (4, 360.0, 90.0, 80.0), (8, 560.0, 70.0, 150.0),
                               (16, 700.0, 54.0, 400.0), (32, 760.0, 24.0, 1200.0)]]

# checker -> (inputs the exercise supplies, a correct answer)
CASES: dict[str, tuple[dict, object]] = {
    "parameter_count": ({"shape": "llama-3.2-3b"}, 3.2127e9),
    "weight_memory": ({"shape": "llama-3.2-3b"}, 6.43),
    "kv_cache_size": ({"shape": "llama-3.2-3b", "context_tokens": 8192}, 0.9395),
    "ms_per_token": ({"inference_time_ms": 823.4, "tokens_generated": 145}, 5.679),
    "time_per_output_token": ({"inference_time_ms": 823.4, "time_to_first_token_ms": 23.4,
                               "tokens_generated": 145}, 800 / 144),
    "bandwidth_floor": ({"weight_bytes": 6.43e9, "bandwidth_bytes_per_s": 3.02e12}, 2.13),
    "fp8_floor": ({"shape": "llama-3.2-3b", "bandwidth_bytes_per_s": 3.02e12}, 1.065),
    "p95_latency": ({"latencies_ms": LATENCIES}, float(np.percentile(LATENCIES, 95))),
    "littles_law_throughput": ({"single_request_latency_s": 0.8, "concurrency": 5}, 1.25),
    "littles_law_latency": ({"single_request_latency_s": 0.8, "concurrency": 5}, 4.0),
    "idle_percent": ({"utilization_trace": [0, 0, 3, 80, 90, 100]}, 50.0),
    "effective_cost": ({"hourly_price": 3.0, "utilization": 0.18}, 16.67),
    "timeline_request_count": ({"request_spans": SPANS}, 4),
    "timeline_idle_gap": ({"request_spans": SPANS}, (2.0, 4.0)),
    "best_batch_size": ({"rows": ROWS, "p95_target_ms": 250}, 4),
    "memory_per_server": ({"rows": SHARED}, (33.2 - 9.1) / 3),
    "servers_that_fit": ({"rows": SHARED, "capacity_gb": 80}, 9),
    "servers_to_match": ({"rows": SHARED}, 51),
    "kv_pages_needed": ({"requests": 16, **LONG}, 16 * 33),
    "kv_pages_in_memory": ({"cache_gb": 14.0, "shape": "llama-3.2-3b"}, 7629),
    "requests_that_fit": ({"kv_pages_total": 8178, **LONG}, 247),
    "rate_where_ttft_passes": ({"rows": RATES, "target_ms": 141.0}, 32.0),
    "knee_concurrency": ({"rows": FRONTIER}, 8),
    "highest_concurrency_meeting_slo": ({"rows": FRONTIER, "ttft_p95_ms": 1000,
                                         "tokens_per_user": 40}, 16),
    "cost_per_million_tokens": ({"hourly_price": 3.0, "tokens_per_second": 560},
                                3.0 / (560 * 3600) * 1e6),
    "gpus_for_traffic": ({"daily_tokens": 1e9, "tokens_per_second_per_gpu": 560}, 21),
    "monthly_gpu_cost": ({"gpus": 21, "hourly_price": 3.0}, 45_990),
}


def run(name: str, answer):
    inputs, _ = CASES[name]
    return getattr(answers, name)(answer, **inputs)


def test_every_exercise_has_a_case_and_a_checker():
    assert set(CASES) == set(answers.EXERCISES)
    assert len(answers.EXERCISES) >= 9
    assert all(callable(getattr(answers, name)) for name in answers.EXERCISES)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("stub", [None, ...])
def test_stub_says_not_answered_yet(name, stub, capsys):
    result = run(name, stub)
    assert result.status == "unanswered" and not result
    assert "not answered yet" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(CASES))
def test_correct_answer_is_accepted(name, capsys):
    result = run(name, CASES[name][1])
    assert result.correct, result.message
    assert capsys.readouterr().out.startswith("✅")


@pytest.mark.parametrize("name", sorted(set(CASES) - {"timeline_idle_gap", "best_batch_size"}))
def test_far_off_answer_is_wrong_without_revealing_the_reference(name):
    answer = CASES[name][1]
    result = run(name, answer * 37)
    assert result.status == "wrong"
    assert "(reference" not in result.message and f" {result.expected:.4g} " not in result.message


@pytest.mark.parametrize("answer", ["6.4", True, float("nan"), [1, 2]])
def test_unusable_answer_is_reported_not_raised(answer):
    result = answers.weight_memory(answer, "llama-3.2-3b")
    assert result.status == "invalid"
    assert "⚠️" in result.message


def test_close_answer_says_how_far_off():
    result = answers.parameter_count(3.3e9, "llama-3.2-3b")
    assert result.status == "close"
    assert "2.7% above" in result.message and "±1%" in result.message and "±5%" in result.message


@pytest.mark.parametrize(("checker", "answer", "phrase", "status"), [
    (lambda a: answers.parameter_count(a, "llama-3.2-3b"), 3.2127e9 + 128256 * 3072, "once",
     "wrong"),
    (lambda a: answers.weight_memory(a, "llama-3.2-3b"), 3.2127e9 * 2 / 2**30, "GiB", "close"),
    (lambda a: answers.weight_memory(a, "llama-3.2-3b"), 3.2127e9 * 4 / 1e9, "float32", "wrong"),
    (lambda a: answers.kv_cache_size(a, "llama-3.2-3b", 8192), 0.9395 / 2, "K and V", "wrong"),
    (lambda a: answers.kv_cache_size(a, "llama-3.2-3b", 8192), 0.9395 * 3, "num_key_value",
     "wrong"),
    (lambda a: answers.ms_per_token(a, 823.4, 145), 145 / 0.8234, "tokens per second", "wrong"),
    (lambda a: answers.p95_latency(a, LATENCIES), 1543.0, "maximum", "wrong"),
    (lambda a: answers.littles_law_throughput(a, 0.8, 5), 6.25, "parallel", "wrong"),
    (lambda a: answers.littles_law_latency(a, 0.8, 5), 0.8, "queue", "wrong"),
    (lambda a: answers.idle_percent(a, [0, 0, 3, 80, 90, 100]), 0.5, "fraction", "wrong"),
    (lambda a: answers.effective_cost(a, 3.0, 0.18), 0.54, "divide", "wrong"),
    (lambda a: answers.memory_per_server(a, SHARED), 33.2 / 4, "including memory", "close"),
    (lambda a: answers.servers_that_fit(a, SHARED, 80), 10, "one too many", "close"),
    (lambda a: answers.servers_to_match(a, SHARED), 50, "round up", "close"),
    (lambda a: answers.kv_pages_needed(a, 16, **LONG), 524, "rounds the tokens of all", "close"),
    (lambda a: answers.kv_pages_needed(a, 16, prompt_tokens=40, output_tokens=512), 16 * 32,
     "prompt's tokens", "wrong"),
    (lambda a: answers.kv_pages_in_memory(a, 14.0, "llama-3.2-3b"), 7629 * 2, "K and V",
     "wrong"),
    (lambda a: answers.kv_pages_in_memory(a, 14.0, "llama-3.2-3b"), 7629.39, "round it down",
     "close"),
    (lambda a: answers.kv_pages_in_memory(a, 14.0, "llama-3.2-3b"), 8192, "GiB", "wrong"),
    (lambda a: answers.requests_that_fit(a, 8178, **LONG), 8178 * 16 // 524, "tokens, not",
     "close"),
    (lambda a: answers.requests_that_fit(a, 8178, **LONG), 248, "round down", "close"),
    (lambda a: answers.rate_where_ttft_passes(a, RATES, 141.0), 16.0, "within the target",
     "wrong"),
    (lambda a: answers.rate_where_ttft_passes(a, RATES, 141.0), 64.0, "lower measured rate",
     "wrong"),
    (lambda a: answers.rate_where_ttft_passes(a, RATES, 141.0), 20.0, "not one of", "wrong"),
    (lambda a: answers.knee_concurrency(a, FRONTIER), 32, "highest throughput", "wrong"),
    (lambda a: answers.knee_concurrency(a, FRONTIER), 1, "fastest per user", "wrong"),
    (lambda a: answers.highest_concurrency_meeting_slo(a, FRONTIER, 1000, 40), 32,
     "both conditions", "wrong"),
    (lambda a: answers.highest_concurrency_meeting_slo(a, FRONTIER, 1000, 40), 8,
     "a higher measured one", "close"),
    (lambda a: answers.cost_per_million_tokens(a, 3.0, 560), 3.0 / (560 * 3600) * 1e3,
     "per thousand", "wrong"),
    (lambda a: answers.cost_per_million_tokens(a, 3.0, 560), 3.0 / 560 * 1e6, "3,600 first",
     "wrong"),
    (lambda a: answers.gpus_for_traffic(a, 1e9, 560), math.ceil(1e9 / 560), "86,400", "wrong"),
    (lambda a: answers.gpus_for_traffic(a, 1e9, 560), 20, "round up", "close"),
    (lambda a: answers.monthly_gpu_cost(a, 21, 3.0), 3.0 * 730, "one GPU's month", "wrong"),
    (lambda a: answers.monthly_gpu_cost(a, 21, 3.0), 21 * 3.0 * 24, "one day", "wrong"),
])
def test_known_mistakes_get_a_specific_explanation(checker, answer, phrase, status):
    """A known mistake is explained; its mark is set by the checker's bands like any answer's
    (a GB/GiB slip is within weight_memory's 🟡 band, a rounding slip is 🟡 for a count)."""
    result = checker(answer)
    assert result.status == status, result.message
    assert phrase in result.message


def test_strict_mode_raises_on_anything_but_correct(monkeypatch):
    monkeypatch.setenv(answers.STRICT_ENV, "1")
    assert answers.ms_per_token(5.679, 823.4, 145)
    with pytest.raises(answers.ExerciseNotPassed, match="not yet"):
        answers.ms_per_token(50, 823.4, 145)
    with pytest.raises(answers.ExerciseNotPassed, match="not answered yet"):
        answers.ms_per_token(None, 823.4, 145)


def test_parameter_count_from_config_matches_a_real_model_and_the_3b_figure():
    model = synthetic.build_synthetic("tiny", torch.device("cpu"), torch.float32)
    config = synthetic.synthetic_config("tiny")
    assert memory.parameter_count_from_config(config) == model.num_parameters()
    three_b = memory.parameter_count_from_config(synthetic.synthetic_config("llama-3.2-3b"))
    assert round(three_b / 1e9, 2) == 3.21


def test_references_come_from_labkit():
    expected = cost.effective_cost(2.5, 0.3).per_useful_hour
    assert answers.effective_cost(expected, 2.5, 0.3).expected == pytest.approx(expected)
    config = synthetic.synthetic_config("llama-3.1-8b")
    kv = memory.kv_cache_bytes(config, torch.bfloat16, 4, 1000) / 2**20
    assert answers.kv_cache_size(kv, "llama-3.1-8b", 1000, batch_size=4, unit="MiB").correct


def test_p95_leaves_failed_requests_out():
    with_failures = LATENCIES + [None, float("nan")]
    assert answers.p95_latency(float(np.percentile(LATENCIES, 95)), with_failures).correct


def test_p95_other_percentile_definition_is_named():
    answer = float(np.percentile(LATENCIES, 95, method="lower"))
    assert "linear interpolation" in answers.p95_latency(answer, LATENCIES).message


def test_timeline_answers():
    assert answers.timeline_request_count(2, SPANS, window=(1.5, 4.5)).correct
    assert answers.timeline_request_count(3, SPANS).status == "close"
    assert answers.timeline_idle_gap((2.1, 3.9), SPANS).correct
    assert answers.timeline_idle_gap((2.5, 3.5), SPANS).status == "close"
    assert "not the longest" in answers.timeline_idle_gap((1.0, 1.2), SPANS).message
    assert answers.timeline_idle_gap("soon", SPANS).status == "invalid"
    assert answers.idle_intervals([(0, 2), (1, 3), (5, 6)]) == [(3, 5)]


def test_best_batch_size_explains_a_row_over_the_target():
    result = answers.best_batch_size(8, ROWS, 250)
    assert result.status == "wrong" and "over the 250 ms target" in result.message
    pandas = pytest.importorskip("pandas")
    assert answers.best_batch_size(8, pandas.DataFrame(ROWS), 500).correct


def test_sharing_checkers_read_cpu_rows_by_their_memory_key():
    rows = [dict(r, server_rss_gb=r["servers"] * 0.9 + 0.1, gpu_memory_used_gb=None)
            for r in SHARED]
    assert answers.memory_per_server(0.9, rows, memory_key="server_rss_gb").correct
    assert answers.servers_that_fit(8, rows, 7.3, memory_key="server_rss_gb").correct  # exactly
    assert answers.servers_that_fit(7, rows, 7.2, memory_key="server_rss_gb").correct


@pytest.mark.parametrize(("call", "match"), [
    (lambda: answers.memory_per_server(1, SHARED[:1]), "two different server counts"),
    (lambda: answers.servers_to_match(1, SHARED[:3]), "batched"),
    (lambda: answers.servers_that_fit(1, SHARED, 5), "already uses"),
    (lambda: answers.weight_memory(1, "llama-9"), "unknown shape"),
    (lambda: answers.weight_memory(1, "tiny", unit="gigs"), "unit"),
    (lambda: answers.p95_latency(1, [None]), "no finite values"),
    (lambda: answers.ms_per_token(1, 100, 0), "tokens_generated"),
    (lambda: answers.best_batch_size(1, ROWS, 50), "no measured batch size"),
    (lambda: answers.effective_cost(1, 3.0, 18), "fraction"),
])
def test_bad_exercise_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_the_ttft_rate_needs_a_rate_over_the_target():
    with pytest.raises(ValueError, match="no measured rate"):
        answers.rate_where_ttft_passes(32.0, RATES, 1000.0)
