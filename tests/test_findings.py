"""labkit.course.findings and the table builders of labkit.course.experiments: the conclusions a
notebook prints follow its measured rows, on both sides of every verdict."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from labkit.course import experiments, findings, notebook
from labkit.course.setup_check import Check
from labkit.measure.readers import CPU_MODE_LABEL


def row(mode="sequential", c=1, rps=1.0, **extra) -> dict:
    base = {"mode": mode, "series": mode, "concurrency": c, "requests_per_second": rps,
            "output_tokens_per_sec": 150 * rps, "p50_ms": 1000 / rps, "p95_ms": 1200 / rps,
            "mean_util": 20.0, "utilization_source": "nvml", "mean_batch_size": 1.0,
            "generation_ms": 3000.0, "sm_activity_mean": 5.0, "tensor_activity_mean": 0.2}
    return {**base, **extra}


def test_setup_names_the_mode_and_the_lines_to_fix():
    ok = [Check("GPU", True, "H200"), Check("driver", True, "580")]
    assert "Mode for the rest of the lab: GPU." in findings.setup(ok)
    assert "Everything checked out." in findings.setup(ok)
    cpu = [Check("GPU", False, "none", "fix"), Check("NVML", False, "none", "fix")]
    text = findings.setup(cpu)
    assert "CPU." in text and "Lines to look at: GPU, NVML." in text
    assert "Everything checked out" not in text
    no_gpu_line = findings.setup([Check("driver", True, "580")])
    assert "Mode for the rest of the lab: CPU." in no_gpu_line


def test_load_says_which_dominates_memory():
    small = findings.load("m", "cuda:0", 0.5, 6_430_000_000, 114_688, 170)
    assert "adds only 19.5 MB, 0.3% of the weights (under 100%)" in small
    assert "dominated by the weights" in small and "more than the weights" not in small
    big = findings.load("m", "cpu", 0.5, 10_000_000, 114_688, 170)
    assert "adds 19.5 MB, more than the weights (1.9x)" in big
    assert "the KV cache, not the model, fills the memory" in big
    assert "A CPU does not change that" in big and "dominated" not in big


def result(ttft, tpot, total, tokens=150):
    return SimpleNamespace(time_to_first_token_ms=ttft, time_per_output_token_ms=tpot,
                           inference_time_ms=total, tokens_generated=tokens,
                           tokens_per_second=tokens / total * 1000)


def test_single_inference_uses_medians_and_the_floor():
    runs = [result(20, 20.0, 3000), result(30, 22.0, 3300), result(25, 21.0, 3100)]
    text = findings.single_inference(runs, result(900, 60, 9000), result(25, 21, 3000),
                                     floor_ms=2.0, device="cuda:0")
    assert "3 150-token requests on cuda:0, medians: TTFT 25.0 ms, 21.00 ms/token, " \
        "3100 ms" in text
    varied = [result(20, 20.0, 3000, tokens=90), *runs[1:]]  # sampled: one stopped early
    assert "3 90- to 150-token requests" in findings.single_inference(
        varied, result(900, 60, 9000), result(25, 21, 3000), floor_ms=2.0, device="cuda:0")
    assert "3.0x as long as a warm one." in text and "10.5x the memory-bandwidth floor" in text
    noisy = findings.single_inference(runs, result(900, 60, 2900), result(25, 21, 3000),
                                      floor_ms=2.0, device="cpu")
    assert "1.0x as long as a warm one: here its one-off costs were lost" in noisy
    assert "median 21.00 ms per output token" in findings.runs_table(runs)


BAD = [{"case": "not JSON", "path": "/generate", "status": 400},
       {"case": "GET /generate", "path": "/generate", "status": 405},
       {"case": "unknown path", "path": "/nope", "status": 404}]


def test_serving_reads_the_servers_counters_and_the_bad_requests_rows():
    stats = {"requests_served": 7, "requests_rejected": 2, "busy_fraction": 0.25}
    reply = {"tokens_generated": 150, "inference_time_ms": 3200.0, "device": "cuda"}
    text = findings.serving(stats, reply, [1.0, 4.2, 2.0], BAD, [30.0, 50.0, 3030.0])
    assert "All 3 bad requests got a 4xx" in text
    assert "counted 2 rejected: the 2 sent to /generate" in text and "at most 4 ms" in text
    assert "busy 25%" in text
    assert "3 chunks, the first 30 ms after sending and the last 3000 ms after" in text


def test_serving_says_when_a_bad_request_got_no_4xx_or_the_counts_differ():
    stats = {"requests_served": 7, "requests_rejected": 3, "busy_fraction": 0.25}
    reply = {"tokens_generated": 150, "inference_time_ms": 3200.0, "device": "cuda"}
    bad = [*BAD[:2], {"case": "prompt > context", "path": "/generate", "status": 500}]
    text = findings.serving(stats, reply, [1.0], bad, [30.0])
    assert "2 of 3 bad requests got a 4xx; prompt > context (500) did not" in text
    assert "1 more were counted than sent here" in text
    assert "in one chunk: nothing shows it streamed" in text
    fewer = findings.serving({**stats, "requests_rejected": 1}, reply, [1.0], BAD, [30.0])
    assert "2 bad requests went to /generate, so 1 fewer were counted than sent here" in fewer


def test_bad_requests_table_prints_whole_messages_wrapped_at_words():
    long = "word " * 40 + "END"
    table = experiments.bad_requests_table([{"case": "x", "status": 404, "error": long}])
    assert "END" in table and all(len(line) <= 100 for line in table.splitlines())
    assert all(not line.endswith("wor") for line in table.splitlines())


def test_stream_arrivals_table_shows_first_and_last_chunks_and_gaps():
    arrivals = [10.0 + 20 * i for i in range(40)]
    table = experiments.stream_arrivals_table(arrivals, [f"t{i}" for i in range(40)])
    assert "'t0'" in table and "'t39'" in table and "790.0" in table
    assert "40 chunks from 10.0 to 790.0 ms" in table and "median 20.0 ms" in table


def concurrency_rows(rates, service_ms=(3000, 3000, 3000), requests=(8, 10, 20)):
    """Rows as a one-at-a-time server gives them: each level's mean latency is what its
    closed loop predicts (the first requests of a run find the queue empty)."""
    rows = []
    for c, r, s, n in zip((1, 5, 10), rates, service_ms, requests, strict=True):
        mean = experiments.closed_loop_mean_latency(c, n, s)
        rows.append({"concurrency": c, "requests": n, "requests_per_second": r,
                     "p50_ms": c * s, "p95_ms": c * s, "mean_ms": mean,
                     "queue_ms": mean - s, "service_ms": s})
    return rows


def test_concurrency_flat_and_littles_law_holds():
    flat = findings.concurrency(concurrency_rows([0.33, 0.32, 0.34]))
    assert "flat (within the 25 % this notebook allows)" in flat.replace("25%", "25 %")
    assert "Little's law predicts it" in flat and "within 0%" in flat
    assert "(tolerance 15%)" in flat and "NOT flat" not in flat
    assert "the same within 10%" in flat and "apart" not in flat


def test_concurrency_not_flat_explained_by_the_service_time():
    """The CPU run of issue 23: 1.42 -> 1.76 -> 1.82 req/s, the lone request 26 % slower."""
    cpu = findings.concurrency(concurrency_rows([1.42, 1.76, 1.82], (704, 568, 549)))
    assert "NOT flat (more than 25% apart)" in cpu and "The service time explains it" in cpu
    assert "ranged from 549 to 704 ms" in cpu
    assert "throughput x service time stayed within 25% across the levels (highest/lowest " \
        "1.00)" in cpu
    assert "On a CPU the model shares the cores" in cpu
    assert "more than 10% apart" in cpu and "(1.26x)" in cpu
    assert "Little's law predicts it" in cpu


def test_concurrency_not_flat_and_not_explained():
    odd = findings.concurrency(concurrency_rows([0.33, 0.5, 0.6]))
    assert "NOT flat" in odd and "do not account for it" in odd
    assert "varied by more than 25% across the levels (highest/lowest 1.82)" in odd
    assert "A CPU's changing speed does not explain it" in odd
    assert "explains it" not in odd.replace("does not explain it", "")


def test_littles_law_missed_says_which_level():
    rows = concurrency_rows([0.33, 0.33, 0.33])
    rows[2]["mean_ms"] *= 1.5
    text = findings.concurrency(rows)
    assert "Little's law missed at concurrency 10" in text and "+50%" in text
    assert "over the 15% tolerance" in text and "A slow or busy CPU does not explain it" in text
    assert "predicts it" not in text


def ttft_row(concurrency, itl):
    return {"concurrency": concurrency, "queue_ms": 10.0 * concurrency, "prefill_ms": 18.0,
            "server_ttft_ms": 10.0 * concurrency + 18, "client_ttft_ms": 10.0 * concurrency + 22,
            "client_ttft_p95_ms": 10.0 * concurrency + 30, "itl_ms": itl, "tpot_ms": itl}


def test_client_ttft_token_gaps_the_same_or_apart_state_the_tolerance():
    same = findings.client_ttft([ttft_row(1, 8.0), ttft_row(8, 9.5)])
    assert "every 8.0-9.5 ms (ITL) at every level, within 25% of each other" in same
    assert "the queue delays the first token, not the ones after it" in same
    apart = findings.client_ttft([ttft_row(1, 8.0), ttft_row(8, 10.0)])  # 1.25: not within
    assert "8.0-10.0 ms (ITL) depending on the level, more than 25% apart" in apart
    assert "decode steps themselves changed speed" in apart and "On a CPU" in apart
    assert "at every level, within" not in apart


def test_littles_law_for_a_finite_closed_loop():
    # 10 requests, 5 clients: the first five wait 1..5 services, the next five 5 each
    assert experiments.closed_loop_mean_latency(5, 10, 1000) == pytest.approx(4000)
    assert experiments.closed_loop_mean_latency(1, 8, 1000) == pytest.approx(1000)
    assert experiments.closed_loop_mean_latency(10, 4, 1000) == pytest.approx(2500)
    # a long run tends to Little's steady state, concurrency x service time
    assert experiments.closed_loop_mean_latency(5, 10_000, 1000) == pytest.approx(5000, rel=0.01)
    table = experiments.littles_law_table(concurrency_rows([0.33, 0.33, 0.33]))
    assert "+0%" in table and "30000 ms" in table  # c x service at 10


def test_utilization_wording_differs_in_cpu_mode():
    during = {"mean_util": 21.0, "idle_fraction": 0.1, "sm_activity_mean": 5.5}
    whole = {"mean_util": 15.0, "idle_fraction": 0.4}
    load = {"latency_ms": {"p50": 15000.0}, "requests_per_min": 15.6}
    gpu = findings.utilization(during, whole, load, on_gpu=True)
    assert "the GPU was busy 21 %" in gpu and "only 5.5 % of the SMs" in gpu
    cpu = findings.utilization({"mean_util": 97.0, "idle_fraction": 0.0}, whole, load,
                               on_gpu=False)
    assert "CPU mode: not GPU utilization" in cpu and "SMs" not in cpu
    assert "the GPU" not in cpu


def test_utilization_sm_activity_against_the_busy_share():
    whole = {"mean_util": 15.0, "idle_fraction": 0.4}
    load = {"latency_ms": {"p50": 15000.0}, "requests_per_min": 15.6}
    low = findings.utilization({"mean_util": 21.0, "idle_fraction": 0.1, "sm_activity_mean": 5.5},
                               whole, load, on_gpu=True)
    assert "only 5.5 % of the SMs were active, under 50% of the 21 % busy share" in low
    assert "a kernel running is not the chip working" in low
    high = findings.utilization({"mean_util": 21.0, "idle_fraction": 0.1,
                                 "sm_activity_mean": 12.0}, whole, load, on_gpu=True)
    assert "SM activity averaged 12.0 %, at least 50% of the 21 % busy share" in high
    assert "kept most of the chip working" in high and "only" not in high


def test_window_table_shows_gpm_rows_only_where_measured():
    gpu = {"mean_util": 21.0, "idle_fraction": 0.1, "sm_activity_mean": 5.5,
           "tensor_activity_mean": 0.3, "dram_bw_mean": 40.0}
    table = findings.window_table(gpu, {**gpu, "mean_util": 15.0}, "GPU utilization (NVML)")
    assert "utilization = GPU utilization (NVML)" in table
    assert "SM activity" in table and "DRAM bandwidth" in table and "15.0 %" in table
    cpu = findings.window_table({"mean_util": 97.0, "idle_fraction": 0.0},
                                {"mean_util": float("nan"), "idle_fraction": 0.5},
                                "inference worker busy (CPU mode)")
    assert "CPU mode" in cpu and "SM activity" not in cpu and "n/a" in cpu


def test_baseline_table_puts_values_beside_the_seeds_ranges():
    during = {"mean_util": 21.1, "idle_fraction": 0.14}
    whole = {"mem_used_max_gb": 7.9}
    load = {"latency_ms": {"p50": 22711.0, "p95": 27474.0}, "requests_per_min": 12.0}
    health = {"model": "m", "device": "cuda", "gpu_name": "NVIDIA H200", "load_time_s": 0.6}
    baseline = findings.baseline(load, during, whole, health, "GPU utilization")
    table = findings.baseline_table(baseline)
    assert "Baseline on NVIDIA H200 with m" in table
    assert "latency_p50_ms" in table and "22711.0" in table and "700-1000 ms" in table
    assert "idle_pct" in table and "14.0" in table
    cpu = findings.baseline(load, {**during, "mean_util": None}, whole,
                            {**health, "device": "cpu", "gpu_name": None}, "worker busy")
    cpu_table = findings.baseline_table(cpu)
    assert "Baseline on CPU (no GPU) with m" in cpu_table and "H200" not in cpu_table
    assert "utilization_mean_pct" in cpu_table and "n/a" in cpu_table


def test_batching_above_or_not_above_the_seeds_promise():
    seq = [row(c=1, rps=0.3), row(c=4, rps=0.33)]
    fast = findings.batching(seq, [row("batched", 1, 1.0), row("batched", 32, 16.0,
                                                             mean_batch_size=32.0)])
    assert "48.5x" in fast and "above that line." in fast and "not above" not in fast
    assert "Batching gains about its batch size" not in fast
    slow = findings.batching(seq, [row("batched", 4, 0.8, mean_batch_size=4.0)])
    assert "measured 2.4x, not above that line" in slow
    assert "Batching gains about its batch size where a step costs the same" in slow
    assert "On a CPU each request in a batch adds its own compute" in slow


def test_batching_in_cpu_mode_says_what_it_cannot_show():
    cpu = dict(utilization_source="cpu-mode", sm_activity_mean=None)
    text = findings.batching([row(c=1, rps=2.0, **cpu)],
                             [row("batched", 16, 9.0, mean_batch_size=16.0, **cpu)])
    assert "CPU mode" in text and "need a GPU" in text
    assert "Mean NVML utilization" not in text and "SM activity:" not in text
    gpu = findings.batching([row(c=1, rps=2.0)], [row("batched", 16, 9.0, mean_batch_size=16.0)])
    assert "Mean NVML utilization: 20.0 % sequential" in gpu and "SM activity: 5.0 %" in gpu
    assert "CPU mode" not in gpu


@pytest.mark.parametrize(("lone_ms", "verdict"), [
    (3050.0, "(1.00x): the same within 10%: the model ran as fast for it as for queued "
             "requests, so a lone request pays no extra here"),
    (3300.0, "(1.08x): the same within 10%"),
    (3400.0, "(1.11x): more than 10% apart, so the model itself ran at a different speed"),
    (5300.0, "more than 10% apart, so the model itself ran at a different speed at that level: "
             "eager decoding is launch-bound, so its speed follows the CPU's"),
])
def test_a_lone_request_is_judged_by_the_servers_generation_time(lone_ms, verdict):
    seq = [row(c=1, rps=0.19, generation_ms=lone_ms), row(c=4, rps=0.3, generation_ms=3000.0),
           row(c=16, rps=0.3, generation_ms=3100.0)]
    text = findings.batching(seq, [row("batched", 1, 1.0), row("batched", 16, 10.0)])
    assert verdict in text
    assert f"took {lone_ms:.0f} ms of generation against 3050 ms" in text
    assert "nothing to batch" in text
    other = "pays no extra" if "apart" in verdict else "apart"
    assert other not in text


def test_no_lone_request_verdict_without_a_concurrency_1_level():
    seq = [row(c=4, rps=0.3), row(c=16, rps=0.3)]
    text = findings.batching(seq, [row("batched", 16, 10.0)])
    assert "A lone request" not in text and "nothing to batch" not in text


def test_eager_vs_cuda_graphs_line():
    seq = [row(c=1, rps=0.2)]
    bat = [row("batched", 32, 16.6, mean_batch_size=32.0, mean_util=85.7)]
    eager = [row("batched", 32, 3.34, mean_batch_size=32.0, mean_util=14.1)]
    text = findings.batching(seq, bat, eager)
    assert "batching alone gave 3.34 req/s (16.7x sequential" in text
    assert "with CUDA graphs 16.60 req/s (5.0x more, utilization 85.7 %)." in text
    assert "no faster" not in text
    slower = findings.batching(seq, [row("batched", 32, 3.0, mean_batch_size=32.0)], eager)
    assert "with CUDA graphs 3.00 req/s (0.9x, no faster; utilization 20.0 %)" in slower
    assert "launching the kernels was not what held this batch back" in slower
    assert "CPU mode has no CUDA graphs" in slower and "x more" not in slower
    assert "batching alone" not in findings.batching(seq, bat)  # no eager run: no line


def shared(servers, rps, gb, mode="sequential"):
    return row(mode, 16, rps, servers=servers, series=f"{servers} x {mode}",
               gpu_memory_used_gb=gb, server_rss_gb=1.0)


def test_sharing_finds_the_best_set_up_and_explains_memory_growth():
    rows = [shared(1, 0.22, 9.1), shared(2, 0.30, 17.1), shared(4, 0.47, 33.2),
            shared(1, 11.06, 13.1, mode="batched")]
    text = findings.sharing(rows)
    assert "Best with 1, 2, 4 servers sharing the device: 0.47 req/s with 4 (2.14x" in text
    assert "23.5x the best sharing set-up" in text
    assert "33.20 GB with 4 servers vs 9.10 GB with one (3.6x, over 75% of the one-server " \
        "figure per server): every process loads its own weights and CUDA context." in text
    assert "Utilization vs SM activity: 20 % / 5.0 % for 4 sequential servers" in text
    assert "CPU cores" not in text


@pytest.mark.parametrize(("gb", "rss", "verdict"), [
    ((9.1, 17.1, 33.2), None, "(3.6x, over 75% of the one-server figure per server): every "
                              "process loads its own weights and CUDA context."),
    ((9.1, 12.0, 20.0), None, "(2.2x, under 75% of the one-server figure per server): less "
                              "than a copy per server was counted. NVML counts the whole card"),
    ((None,) * 3, (1.0, 2.0, 3.9), "(3.9x, over 75% of the one-server figure per server): every "
                                   "process loads its own runtime and weights."),
    ((None,) * 3, (1.0, 1.5, 2.0), "(2.0x, under 75% of the one-server figure per server): less "
                                   "than a copy per server was counted. Resident memory leaves "
                                   "out pages"),
])
def test_memory_growth_per_server_on_both_sides(gb, rss, verdict):
    rows = [{**shared(n, 0.2 * n, g), "server_rss_gb": r}
            for n, g, r in zip((1, 2, 4), gb, rss or (None,) * 3, strict=True)]
    text = findings.sharing([*rows, shared(1, 11.0, 13.1, mode="batched")])
    where = "GPU memory in use" if rss is None else "Resident memory of the servers"
    assert f"{where}: " in text and verdict in text


def test_sharing_on_a_cpu_names_the_cores():
    cpu = dict(utilization_source="cpu-mode", sm_activity_mean=None)
    rows = [{**shared(1, 2.0, None), **cpu}, {**shared(2, 3.5, None), **cpu},
            {**shared(1, 9.0, None, mode="batched"), **cpu}]
    text = findings.sharing(rows, cpu_cores=2)
    assert "This machine has 2 CPU cores" in text and "Resident memory" in text
    assert "Utilization vs SM activity" not in text and "GPU memory" not in text


def test_sweep_tables_say_what_util_means_in_each_mode():
    gpu = experiments.table([row(c=1), row("batched", 8, 4.0, mean_batch_size=8.0)])
    assert "util % = NVML utilization.gpu" in gpu and "CPU mode" not in gpu
    cpu_row = row(c=1, utilization_source="cpu-mode", sm_activity_mean=None)
    for table in (experiments.table, experiments.shared_table, experiments.activity_table):
        cpu = table([cpu_row])
        assert "util % = CPU mode" in cpu and "no SM activity" in cpu and "NVML" not in cpu
    assert experiments.table([]).endswith("(no rows)\ngen ms = the server's generation time "
                                          "per request (inference_time_ms), queueing left out")


def test_exercise_4_3_compares_only_like_with_like():
    saved = {"max_tokens": 150, "rows": [{"concurrency": 5, "mean_ms": 16000.0}]}
    assert "measured 16.00 s" in findings.compare_with_notebook_04(15.0, 5, 150, saved)
    assert "+7%" in findings.compare_with_notebook_04(15.0, 5, 150, saved)
    assert "same value in both" in findings.compare_with_notebook_04(15.0, 5, 64, saved)
    assert "Run notebook 04" in findings.compare_with_notebook_04(15.0, 5, 150, None)
    for blank in (None, "15 s", 0.0):  # the learner copy runs with 4.3 unanswered
        assert "Answer 4.3 first" in findings.compare_with_notebook_04(blank, 5, 150, saved)


def test_gpu_bandwidth_comes_from_the_learners_run_or_the_recorded_one(monkeypatch):
    monkeypatch.setattr(notebook, "load_results", lambda name: None)
    value, where = notebook.gpu_copy_bandwidth()
    assert value == 3.00e12 and "benchmarks/RESULTS.md" in where
    monkeypatch.setattr(notebook, "load_results",
                        lambda name: {"device": "cuda:0", "bandwidth_tb_s": 4.26})
    value, where = notebook.gpu_copy_bandwidth()
    assert value == pytest.approx(4.26e12) and "your notebook 02" in where
    monkeypatch.setattr(notebook, "load_results",
                        lambda name: {"device": "cpu", "bandwidth_tb_s": 0.02})
    assert notebook.gpu_copy_bandwidth()[0] == 3.00e12  # a CPU's copy is no GPU's bandwidth


def test_recorded_bandwidth_is_the_one_in_results_md():
    from pathlib import Path

    results = (Path(__file__).resolve().parent.parent / "benchmarks" / "RESULTS.md").read_text()
    assert "| device-to-device copy (notebook 02) | 3.00 TB/s |" in results


def test_activity_says_only_when_the_chip_worked_less_than_half_the_busy_time():
    low = findings.activity({"mean_util": 21.3, "sm_activity_mean": 5.5,
                             "tensor_activity_mean": 0.2})
    assert low == ("During the load test the GPU was 'utilized' 21 % of the time, but its SMs "
                   "were active only 5.5 % and its tensor cores 0.2 %.")
    high = findings.activity({"mean_util": 96.0, "sm_activity_mean": 74.0,
                              "tensor_activity_mean": 30.0})
    assert "were active 74.0 % (at least 50% of the busy share" in high and "only" not in high
    assert "No GPM metrics here" in findings.activity({"mean_util": 40.0})


# --- 09: the cost frontier (labkit.course.cost_frontier) -------------------------------------

def frontier_setup(name: str, points: list[tuple], slo, cpu: bool = False):
    """A set-up whose sweep measured `points`: (concurrency, tok/s, tok/s per user, TTFT p95)."""
    from labkit.course import cost_frontier
    from labkit.measure import sweep

    rows = [{"kind": "concurrency", "level": c, "output_tokens_per_sec": tok,
             "output_tokens_per_sec_per_gpu": tok, "tokens_per_user": user, "ttft_p95_ms": ttft,
             "latency_p95_ms": ttft + 150_000 / user, "goodput_rps": tok / 150,
             "goodput_share": 1.0, "mean_util": min(95.0, 20.0 + c),
             "sm_activity_mean": None if cpu else min(80.0, 5.0 + c),
             "utilization_source": "cpu-mode" if cpu else "nvml"}
            for c, tok, user, ttft in points]
    for r in rows:
        r["meets_slo"] = slo.point_ok(r)
    doc = sweep.document(rows, kind="concurrency", slo=slo, gpus=1, server=None, config={},
                         label=name, url="u")
    return cost_frontier.Setup(name, doc, "m", "CPU" if cpu else "NVIDIA H100")


def frontier_lab(sequential, continuous, slo=None, cpu=False):
    from labkit.course import cost_frontier
    from labkit.measure import sweep

    slo = slo or sweep.SLO(1000, 20)
    setups = {"sequential": frontier_setup("sequential", sequential, slo, cpu),
              "continuous": frontier_setup("continuous", continuous, slo, cpu)}
    rows = cost_frontier.summary_rows(setups, slo, 3.0)
    return setups, rows, cost_frontier.findings(setups, rows, slo)


SEQ = [(1, 47.0, 47.0, 30.0), (2, 47.5, 46.5, 3200.0), (4, 47.2, 46.8, 9600.0)]
CONT = [(1, 450.0, 450.0, 20.0), (16, 6000.0, 375.0, 60.0), (256, 40000.0, 156.0, 900.0)]


def test_frontier_findings_when_continuous_dominates_and_pays():
    _, rows, text = frontier_lab(SEQ, CONT)
    assert ("The continuous server's frontier dominates the sequential one at every measured "
            "point: for each of the baseline's 3 points") in text and "NOT" not in text
    assert ("sequential: from c=1 to c=4, p95 TTFT went from 30 to 9,600 ms and tok/s per user "
            "from 47.0 to 46.8, within 25% of each other: the load added waiting") in text
    # the knee: 40,000 x 156 = 6.2M beats 6,000 x 375 = 2.25M, and it is the top throughput
    assert "continuous: knee at c=256 (40,000 tok/s at 156.0 tok/s per user); it is also" in text
    best = {r["setup"]: r for r in rows}
    assert best["sequential"]["concurrency"] == 1 and best["continuous"]["concurrency"] == 256
    assert best["continuous"]["cheaper"] == pytest.approx(40000 / 47)
    assert "sequential $17.73, continuous $0.021; cheaper than the baseline: continuous 851.1x" \
        in text
    assert ("GPU utilization: sequential 21.0 % (SM 6.0 %), continuous 95.0 % (SM 80.0 %)."
            in text)


def test_frontier_findings_when_continuous_does_not_dominate_and_why():
    faster_alone = [(1, 130.0, 139.0, 25.0), (2, 96.0, 97.0, 199.0)]
    slower = [(1, 119.0, 128.0, 28.0), (4, 288.0, 96.0, 93.0)]
    _, _, text = frontier_lab(faster_alone, slower, cpu=True)
    assert ("The continuous server's frontier does NOT dominate the sequential one at c=1: at "
            "c=1 the baseline gave 130 tok/s at 139.0 tok/s per user") in text
    assert "decoded faster per user there than the continuous server did at any level" in text
    assert "more than 25% apart: the decode itself ran at another speed" in text
    assert findings.CPU_SPEED in text
    assert "server busy share (CPU mode, not GPU utilization)" in text and "SM" not in text
    # as fast per user, but less in total there
    _, _, text = frontier_lab([(1, 130.0, 100.0, 25.0)], [(1, 50.0, 120.0, 20.0),
                                                          (4, 300.0, 90.0, 40.0)])
    assert "served fewer tok/s in total than the baseline did there" in text


def test_frontier_findings_when_a_set_up_misses_the_slo():
    from labkit.course import cost_frontier
    from labkit.measure import sweep

    strict = sweep.SLO(100, 20)
    setups, rows, text = frontier_lab(SEQ, CONT, slo=strict)
    assert "sequential at best c=1" in text and "continuous at best c=16" in text
    _, rows, text = frontier_lab([(1, 47.0, 47.0, 300.0)], CONT, slo=strict)
    base = rows[0]
    assert not base["meets_slo"] and base["cheaper"] is None and rows[1]["cheaper"] is None
    assert "sequential met it at no measured level" in text
    assert "The baseline met the SLO at no measured level, so nothing serves its users" in text
    assert "conc" in cost_frontier.best_table(rows, strict).splitlines()[1]
    table = cost_frontier.summary_table(rows)
    assert "baseline" in table and "missed" in table and "met at c=16" in table
    # a knee below the highest throughput says what the rest cost per user
    _, _, text = frontier_lab(SEQ, [(1, 450.0, 450.0, 20.0), (8, 3000.0, 400.0, 40.0),
                                    (64, 3300.0, 60.0, 80.0)])
    assert ("continuous: knee at c=8 (3,000 tok/s at 400.0 tok/s per user); the highest "
            "throughput, 3,300 tok/s at c=64, cost 85% of the per-user speed.") in text


def test_notebook_05_prices_the_gpus_idle_time_and_labels_a_cpus_busy_share():
    during, load = {"mean_util": 21.3}, {"requests_per_sec": 0.254}
    on_gpu = findings.idle_cost(3.0, during, load, on_gpu=True)
    assert on_gpu == ("At $3.00/h and 21% mean utilization: $14.08 per hour of useful compute; "
                      "$2.36 of every hour pays for idle time.\nAt 0.25 req/s this server costs "
                      "$3.28 per 1,000 requests.")
    on_cpu = findings.idle_cost(3.0, {"mean_util": 99.0}, load, on_gpu=False)
    assert "99% busy (CPU mode: the worker's busy share, not GPU utilization)" in on_cpu
    assert "the arithmetic is the lesson" in on_cpu
    assert "no useful compute" in findings.idle_cost(3.0, {"mean_util": None}, load, True)
    row = dict.fromkeys(findings.SEED_RANGES, 1.0)
    table = findings.baseline_table({**row, "gpu_name": None, "model": "m",
                                     "utilization_label": CPU_MODE_LABEL})
    assert "the inference worker's busy share in CPU mode" in table
    assert "busy share" not in findings.baseline_table({**row, "gpu_name": "H100", "model": "m",
                                                        "utilization_label": "GPU"})
