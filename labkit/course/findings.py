"""What each notebook concludes, built from the rows it measured ("What you saw").

Every function takes measured values (rows of `labkit.course.experiments`, load-test summaries,
sampler summaries, engine results) and returns the conclusions as bullet lines of text. Nothing
here measures or hard-codes a result: the same code says "flat" or "NOT flat", "above" or "not
above", from whatever the learner's machine gave. `tests/test_findings.py` checks both sides.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from labkit.measure import cost
from labkit.measure.readers import CPU_MODE_LABEL

SEED_PHASE3_UTILIZATION = "60-80 %"  # the seed's Phase 3 promise for GPU sharing
FLAT_SPREAD = 1.25  # highest/lowest throughput under this counts as flat
# Why a model's speed moves between the levels of one run on a CPU (notebook 04's verdicts).
CPU_SPEED = ("On a CPU the model shares the cores with the load tester and the server's own "
             "work, so its speed moves with them.")
SEED_RANGES = {  # the seed's baseline table: A100, a real 3B model
    "model_load_time_s": "30-60 sec", "gpu_memory_used_gb": "6-8 GB",
    "latency_p50_ms": "700-1000 ms", "latency_p95_ms": "1000-1500 ms",
    "throughput_req_per_min": "60-90 req/min", "utilization_mean_pct": "15-25 %",
    "idle_pct": "75-85 %",
}


def bullets(lines: Sequence[str]) -> str:
    return "\n".join(f"- {line}" for line in lines)


def _pct(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.1f} %"


# --- 00 -------------------------------------------------------------------------------------

def setup(checks) -> str:
    """Notebook 00: GPU or CPU mode, and which checks need a look."""
    gpu = next((c for c in checks if c.name == "GPU"), None)
    problems = [c.name for c in checks if not c.ok]
    return bullets([
        f"Mode for the rest of the lab: {'GPU' if gpu is not None and gpu.ok else 'CPU'}.",
        "Everything checked out." if not problems
        else f"Lines to look at: {', '.join(problems)}.",
    ])


# --- 01 -------------------------------------------------------------------------------------

def load(name: str, device: str, load_time_s: float, weight_bytes: int,
         kv_bytes_per_token: int, sequence_tokens: int) -> str:
    """Notebook 01: load time, weights, and what one request's KV cache adds."""
    request_kv = kv_bytes_per_token * sequence_tokens
    return bullets([
        f"Loading {name} took {load_time_s:.1f} s on {device}.",
        f"Its weights need {weight_bytes / 1e9:.2f} GB; each token in flight adds "
        f"{kv_bytes_per_token / 1024:.1f} KiB of KV cache.",
        f"One request of {sequence_tokens} tokens adds only {request_kv / 1e6:.1f} MB, "
        f"{request_kv / weight_bytes:.1%} of the weights (under 100%): memory is dominated by "
        "the weights, which stay loaded whether requests come or not."
        if request_kv < weight_bytes else
        f"One request of {sequence_tokens} tokens adds {request_kv / 1e6:.1f} MB, more than the "
        f"weights ({request_kv / weight_bytes:.1f}x): at this length the KV cache, not the "
        "model, fills the memory. A CPU does not change that: both sizes follow from the "
        "model's shape and dtype alone.",
    ])


# --- 02 -------------------------------------------------------------------------------------

def median_timings(results) -> dict[str, float]:
    """Median TTFT, time per output token and total time (ms) over engine results."""
    tpots = [r.time_per_output_token_ms for r in results if r.time_per_output_token_ms]
    return {"ttft_ms": statistics.median(r.time_to_first_token_ms for r in results),
            "tpot_ms": statistics.median(tpots) if tpots else math.nan,
            "total_ms": statistics.median(r.inference_time_ms for r in results)}


def runs_table(results) -> str:
    lines = [f"{'run':>3} {'tokens':>7} {'TTFT ms':>9} {'ms/token':>9} {'total ms':>9} "
             f"{'tok/s':>7}"]
    for i, r in enumerate(results):
        lines.append(f"{i:>3} {r.tokens_generated:>7} {r.time_to_first_token_ms:>9.1f} "
                     f"{r.time_per_output_token_ms or 0:>9.2f} {r.inference_time_ms:>9.1f} "
                     f"{r.tokens_per_second:>7.1f}")
    m = median_timings(results)
    lines.append(f"\nmedian TTFT {m['ttft_ms']:.1f} ms, median {m['tpot_ms']:.2f} ms per output "
                 "token")
    return "\n".join(lines)


def single_inference(results, cold, warm, floor_ms: float, device: str) -> str:
    """Notebook 02: one request's timings, the cold start, and the distance to the floor."""
    m = median_timings(results)
    tokens = sorted(r.tokens_generated for r in results)
    length = (f"{tokens[0]}-token" if tokens[0] == tokens[-1]
              else f"{tokens[0]}- to {tokens[-1]}-token")
    cold_ratio = cold.inference_time_ms / warm.inference_time_ms
    return bullets([
        f"{len(results)} {length} requests on {device}, medians: TTFT {m['ttft_ms']:.1f} ms, "
        f"{m['tpot_ms']:.2f} ms/token, {m['total_ms']:.0f} ms in total.",
        f"The first, cold call took {cold_ratio:.1f}x as long as a warm one"
        + ("." if cold_ratio >= 1.2 else ": here its one-off costs were lost in the run-to-run "
           "noise (another busy process on the machine is the usual cause; run it again)."),
        f"Decode ran at {m['tpot_ms'] / floor_ms:.1f}x the memory-bandwidth floor of "
        f"{floor_ms:.3f} ms/token.",
    ])


# --- 03 -------------------------------------------------------------------------------------

def serving(stats: dict, reply: dict, health_ms: Sequence[float], bad: Sequence[dict],
            arrivals_ms: Sequence[float]) -> str:
    """Notebook 03: what the server did, from its /stats counters, one reply, the health checks
    during a generation, the bad requests' rows and the streamed chunks' arrival times."""
    return bullets([
        *_bad_requests(stats, bad),
        f"One {reply['tokens_generated']}-token generation took "
        f"{reply['inference_time_ms']:.0f} ms on {reply['device']}; health checks during a "
        f"generation took at most {max(health_ms):.0f} ms.",
        _streamed(arrivals_ms),
        f"Since start the server was busy {stats['busy_fraction']:.0%} of the time: idle "
        "whenever nobody is asking.",
    ])


def _bad_requests(stats: dict, bad: Sequence[dict]) -> list[str]:
    client_errors = [r for r in bad if 400 <= r["status"] < 500]
    others = [f"{r['case']} ({r['status']})" for r in bad if not 400 <= r["status"] < 500]
    lines = [f"All {len(bad)} bad requests got a 4xx with a message saying what to fix."
             if not others else
             f"{len(client_errors)} of {len(bad)} bad requests got a 4xx; "
             f"{', '.join(others)} did not: a server bug, worth reporting."]
    generation = sum(1 for r in client_errors if r["path"] == "/generate")
    counted = stats["requests_rejected"]
    lines.append(
        f"The server served {stats['requests_served']} requests and its /stats counted "
        f"{counted} rejected: "
        + (f"the {generation} sent to /generate (a request to a path with no endpoint is not a "
           "generation request)." if counted == generation else
           f"{generation} bad requests went to /generate, so {abs(counted - generation)} "
           f"{'more' if counted > generation else 'fewer'} were counted than sent here (another "
           "client, or an earlier cell run twice)."))
    return lines


def _streamed(arrivals_ms: Sequence[float]) -> str:
    if len(arrivals_ms) < 2:
        return ("The stream brought its answer in one chunk: nothing shows it streamed (ask for "
                "more tokens).")
    spread = arrivals_ms[-1] - arrivals_ms[0]
    return (f"The streamed answer came in {len(arrivals_ms)} chunks, the first "
            f"{arrivals_ms[0]:.0f} ms after sending and the last {spread:.0f} ms after the "
            "first: each piece of text left the server as soon as it was generated, where "
            "/generate sends the whole answer at the end.")


# --- 04 -------------------------------------------------------------------------------------

def concurrency(rows: list[dict]) -> str:
    """Notebook 04: throughput flat or not (and why not), latency and queue growth, a lone
    request against queued ones, Little's law."""
    return bullets([_throughput_flat(rows),
                    f"p50 latency went from {rows[0]['p50_ms']:.0f} ms to "
                    f"{rows[-1]['p50_ms']:.0f} ms; mean queue time from "
                    f"{rows[0]['queue_ms']:.0f} ms to {rows[-1]['queue_ms']:.0f} ms.",
                    *_lone_service(rows), _littles_law(rows)])


def _throughput_flat(rows: list[dict]) -> str:
    rates = [r["requests_per_second"] for r in rows]
    spread = max(rates) / min(rates)
    text = (f"Throughput at concurrency {', '.join(str(r['concurrency']) for r in rows)}: "
            + ", ".join(f"{x:.2f}" for x in rates) + f" req/s, highest/lowest {spread:.2f}")
    if spread < FLAT_SPREAD:
        return text + f": flat (within the {FLAT_SPREAD - 1:.0%} this notebook allows)."
    # One generation at a time: throughput is 1 / service time, whatever the concurrency.
    services = [r["service_ms"] for r in rows]
    served = [rate * service / 1000 for rate, service in zip(rates, services, strict=True)]
    explained = max(served) / min(served)  # about 1 when throughput = 1 / service time
    return (text + f": NOT flat (more than {FLAT_SPREAD - 1:.0%} apart). "
            + (f"The service time explains it: it ranged from {min(services):.0f} to "
               f"{max(services):.0f} ms, and throughput x service time stayed within "
               f"{FLAT_SPREAD - 1:.0%} across the levels (highest/lowest {explained:.2f}), as a "
               "one-at-a-time server's throughput is 1 / service time. The requests were not "
               "generated together; each generation ran at a different speed. " + CPU_SPEED
               if explained < FLAT_SPREAD else
               f"The service times do not account for it: throughput x service time varied by "
               f"more than {FLAT_SPREAD - 1:.0%} across the levels (highest/lowest "
               f"{explained:.2f}), so the server overlapped work between requests (a response "
               "going out while the next generation runs), or the levels ran too few requests "
               "to reach a steady state; raise REQUESTS and compare. A CPU's changing speed "
               "does not explain it: that would show in the service time."))


LONE_SAME = 0.10  # a lone request's service time within 10 % of the queued ones': the same


def _lone_service(rows: list[dict]) -> list[str]:
    lone = next((r for r in rows if r["concurrency"] == 1), None)
    queued = [r["service_ms"] for r in rows if r["concurrency"] > 1]
    if lone is None or not queued:
        return []
    others = statistics.fmean(queued)
    ratio = lone["service_ms"] / others
    text = (f"Service time (latency - queue): {lone['service_ms']:.0f} ms for a lone request "
            f"against {others:.0f} ms per queued one ({ratio:.2f}x): ")
    if abs(ratio - 1) <= LONE_SAME:
        return [text + f"the same within {LONE_SAME:.0%}; one generation at a time, whoever "
                "waits."]
    return [text + f"more than {LONE_SAME:.0%} apart. Queueing plays no part in it (the queue "
            "is outside the service time): the generation itself ran at another speed at that "
            "level. Eager decoding follows the speed of the CPU that launches it, and on a "
            "shared machine that varies from run to run."]


LITTLE_TOLERANCE = 0.15  # Little's law "predicts it" when every level is within 15 %


def _littles_law(rows: list[dict]) -> str:
    from labkit.course.experiments import littles_law

    law = littles_law(rows)
    worst = max(law, key=lambda r: abs(r["error"]))
    if abs(worst["error"]) <= LITTLE_TOLERANCE:
        return (f"Little's law predicts it: the mean latency it gives each level (from that "
                f"level's service time) was within {abs(worst['error']):.0%} of the measured "
                f"one (tolerance {LITTLE_TOLERANCE:.0%}).")
    return (f"Little's law missed at concurrency {worst['concurrency']}: predicted "
            f"{worst['predicted_ms']:.0f} ms, measured {worst['measured_ms']:.0f} ms "
            f"({worst['error']:+.0%}, over the {LITTLE_TOLERANCE:.0%} tolerance). The law holds "
            "for any stable system, so its premise failed: the server was not one queue in "
            "front of one generation at a time at that level, or requests were lost or retried "
            "(compare the success counts). A slow or busy CPU does not explain it: each level's "
            "prediction uses that level's own service time.")


def client_ttft(rows: list[dict]) -> str:
    """Notebook 04: TTFT as the streaming client saw it, split by the server's /metrics into
    queue, prefill and the rest (rows of `experiments.client_ttft`)."""
    rows = sorted(rows, key=lambda r: r["concurrency"])
    low, high = rows[0], rows[-1]
    lines = [
        f"At concurrency {low['concurrency']} the first token reached the client "
        f"{low['client_ttft_ms']:.0f} ms after sending: {low['queue_ms']:.0f} ms in the queue, "
        f"{low['prefill_ms']:.0f} ms of prefill, {_outside(low):.0f} ms outside the server "
        "(network and HTTP)."]
    if high is not low:
        prefills = [r["prefill_ms"] for r in rows]
        lines.append(
            f"At concurrency {high['concurrency']} it took {high['client_ttft_ms']:.0f} ms "
            f"(p95 {high['client_ttft_p95_ms']:.0f} ms), "
            f"{_times(high['client_ttft_ms'] / low['client_ttft_ms'])} as long, "
            f"{high['queue_ms'] / high['client_ttft_ms']:.0%} of it waiting in the queue; the "
            f"prefill took {_span(prefills, 0)} ms at every level. A "
            "/generate reply's time_to_first_token_ms counts from the start of its generation: "
            "only a clock at the client shows the wait the user sees.")
    itls = [r["itl_ms"] for r in rows]
    if any(math.isnan(x) for x in itls):  # no request streamed two tokens: no gaps to time
        return bullets(lines)
    if high is low:
        lines.append(f"Once streaming, tokens arrived every {itls[0]:.1f} ms (ITL; TPOT "
                     f"{low['tpot_ms']:.1f} ms).")
    else:
        same = max(itls) / min(itls) < FLAT_SPREAD
        lines.append(
            f"Once streaming, tokens arrived every {_span(itls, 1)} ms (ITL) "
            + (f"at every level, within {FLAT_SPREAD - 1:.0%} of each other: the queue delays "
               "the first token, not the ones after it."
               if same else f"depending on the level, more than {FLAT_SPREAD - 1:.0%} apart: the "
               "decode steps themselves changed speed (compare TPOT), which the queue does not "
               "do. " + CPU_SPEED)
        )
    return bullets(lines)


def _span(values: Sequence[float], digits: int) -> str:
    """'lowest-highest', or one number when they round to the same."""
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return low if low == high else f"{low}-{high}"


def _times(ratio: float) -> str:
    return f"{ratio:.1f}x" if ratio < 10 else f"{ratio:.0f}x"


def _outside(row: dict) -> float:
    """Client TTFT minus the server's: time outside the server (network, HTTP, client)."""
    return row["client_ttft_ms"] - row["server_ttft_ms"]


def compare_with_notebook_04(latency_s: float, concurrency: int, max_tokens: int,
                             saved: dict | None) -> str:
    """Exercise 4.3's prediction next to what notebook 04 measured over HTTP, when notebook 04
    ran on this machine with the same request length."""
    if not isinstance(latency_s, (int, float)) or not latency_s > 0:
        return "Answer 4.3 first (latency_s): your prediction then goes beside notebook 04's."
    rows = (saved or {}).get("rows", [])
    row = next((r for r in rows if r["concurrency"] == concurrency), None)
    if row is None:
        return (f"Run notebook 04 on this machine (concurrency {concurrency}) to compare: it "
                "saves results/concurrency.json.")
    if saved.get("max_tokens") != max_tokens:
        return (f"Notebook 04 ran {saved.get('max_tokens')}-token requests and this exercise "
                f"{max_tokens}: set LABKIT_MAX_TOKENS to the same value in both to compare.")
    measured_s = row["mean_ms"] / 1000
    return (f"Predicted {latency_s:.2f} s; notebook 04 measured {measured_s:.2f} s mean at "
            f"concurrency {concurrency} over HTTP ({measured_s / latency_s - 1:+.0%}). The "
            "server adds tokenization, the queue hand-off and the network to each request; "
            "the decode speed itself can differ between the two runs.")


# --- 05 -------------------------------------------------------------------------------------

def window_table(during: dict, whole: dict, util_label: str) -> str:
    """Sampler summaries of the load test's window and of the whole recording, side by side."""
    lines = [f"utilization = {util_label}",
             f"{'':<28} {'during load':>12} {'whole window':>13}",
             f"{'mean utilization':<28} {_pct(during['mean_util']):>12} "
             f"{_pct(whole['mean_util']):>13}",
             f"{'idle share (< 5 %)':<28} {during['idle_fraction']:>12.0%} "
             f"{whole['idle_fraction']:>13.0%}"]
    for key, name in [("sm_activity_mean", "SM activity"),
                      ("tensor_activity_mean", "tensor activity"),
                      ("dram_bw_mean", "DRAM bandwidth")]:
        if key in during:
            lines.append(f"{name:<28} {_pct(during[key]):>12} {_pct(whole.get(key)):>13}")
    return "\n".join(lines)


def baseline(load: dict, during: dict, whole: dict, health: dict, util_label: str) -> dict:
    """The seed's baseline metrics from a load-test summary, the sampler's summaries (during
    the load, and over the whole recording) and the server's /health."""
    return {
        "model": health["model"], "device": health["device"], "gpu_name": health["gpu_name"],
        "model_load_time_s": health["load_time_s"],
        "gpu_memory_used_gb": whole["mem_used_max_gb"],
        "latency_p50_ms": load["latency_ms"]["p50"], "latency_p95_ms": load["latency_ms"]["p95"],
        "throughput_req_per_min": load["requests_per_min"],
        "utilization_mean_pct": during["mean_util"], "idle_pct": 100 * during["idle_fraction"],
        "sm_activity_mean_pct": during.get("sm_activity_mean"),
        "utilization_label": util_label,
    }


def baseline_table(baseline: dict) -> str:
    """The seed's baseline table, the learner's values beside the seed's ranges; in CPU mode
    the busy and idle rows say they are the inference worker's, not a GPU's."""
    where = baseline["gpu_name"] or "CPU (no GPU)"
    lines = [f"Baseline on {where} with {baseline['model']}\n",
             f"{'Metric':<28} {'Your value':>12}   Seed's range (A100, real 3B model)"]
    for key, seed in SEED_RANGES.items():
        value = baseline[key]
        lines.append(f"{key:<28} {'n/a' if value is None else f'{value:.1f}':>12}   {seed}")
    if baseline.get("utilization_label") == CPU_MODE_LABEL:
        lines.append("(utilization_mean_pct and idle_pct: the inference worker's busy share in "
                     "CPU mode, not GPU utilization)")
    return "\n".join(lines)


def idle_cost(hourly_price: float, during: dict, load: dict, on_gpu: bool) -> str:
    """Notebook 05: one hour at `hourly_price` priced by the load test's mean utilization, and
    the cost of 1,000 requests at its throughput. In CPU mode the busy share stands in for GPU
    utilization, so only the arithmetic carries over: said so."""
    util = (during["mean_util"] or 0) / 100
    if util <= 0:
        return "Utilization was zero: no useful compute to price."
    c = cost.effective_cost(hourly_price, util)
    per_1000 = cost.cost_per_1000_requests(hourly_price, load["requests_per_sec"])
    what = ("mean utilization" if on_gpu
            else "busy (CPU mode: the worker's busy share, not GPU utilization)")
    lines = [f"At ${hourly_price:.2f}/h and {util:.0%} {what}: ${c.per_useful_hour:.2f} per hour "
             f"of useful compute; ${c.idle_cost_per_hour:.2f} of every hour pays for idle time.",
             f"At {load['requests_per_sec']:.2f} req/s this server costs ${per_1000:.2f} per "
             "1,000 requests."]
    if not on_gpu:
        lines.append("(A GPU's price beside a CPU's numbers: the arithmetic is the lesson, not "
                     "the dollars.)")
    return "\n".join(lines)


def utilization(during: dict, whole: dict, load: dict, on_gpu: bool) -> str:
    """Notebook 05: busy and idle time during the load test, and what busy meant."""
    what = "GPU" if on_gpu else "inference worker (CPU mode: not GPU utilization)"
    lines = [f"During the load test the {what} was busy {during['mean_util']:.0f} % on average "
             f"and idle in {during['idle_fraction']:.0%} of samples; over the whole window "
             f"{whole['idle_fraction']:.0%}."]
    if during.get("sm_activity_mean") is not None:
        lines.append(_sm_activity(during["sm_activity_mean"], during["mean_util"]))
    lines.append(f"Baseline: p50 {load['latency_ms']['p50']:.0f} ms, "
                 f"{load['requests_per_min']:.0f} req/min. Notebook 06 serves the same load "
                 "with batching.")
    return bullets(lines)


SM_SHARE_LOW = 0.5  # SM activity under half the busy share: "busy" overstates the work


def _chip_underused(sm: float, util: float) -> bool:
    """SM activity under SM_SHARE_LOW of the busy share: "busy" overstates the work."""
    return bool(util) and sm < SM_SHARE_LOW * util


def activity(during: dict) -> str:
    """Notebook 05, under the timeline: the load test's busy share beside how much of the chip
    worked (GPM), both sides of SM_SHARE_LOW; or why there is nothing to compare."""
    if "sm_activity_mean" not in during:
        return ("No GPM metrics here (they need a Hopper-or-newer GPU and driver support): "
                "only the coarse utilization is available.")
    util, sm = during["mean_util"], during["sm_activity_mean"]
    tensor = during.get("tensor_activity_mean", float("nan"))
    if _chip_underused(sm, util):
        return (f"During the load test the GPU was 'utilized' {util:.0f} % of the time, but its "
                f"SMs were active only {sm:.1f} % and its tensor cores {tensor:.1f} %.")
    return (f"During the load test the GPU was 'utilized' {util:.0f} % of the time, and its SMs "
            f"were active {sm:.1f} % (at least {SM_SHARE_LOW:.0%} of the busy share: the kernels "
            f"kept most of the chip working) and its tensor cores {tensor:.1f} %.")


def _sm_activity(sm: float, util: float) -> str:
    """Utilization counts the time any kernel ran; SM activity, how much of the chip worked."""
    if _chip_underused(sm, util):
        return (f"Even while 'busy', only {sm:.1f} % of the SMs were active, under "
                f"{SM_SHARE_LOW:.0%} of the {util:.0f} % busy share: a kernel running is not the "
                "chip working.")
    return (f"SM activity averaged {sm:.1f} %, at least {SM_SHARE_LOW:.0%} of the {util:.0f} % "
            "busy share: the kernels that ran kept most of the chip working, so the idle time, "
            "not the busy time, is where the waste is.")


# --- 06 -------------------------------------------------------------------------------------

def _best(rows: list[dict]) -> dict:
    return max(rows, key=lambda r: r["requests_per_second"])


def batching(sequential: list[dict], batched: list[dict], eager: Sequence[dict] = ()) -> str:
    """Notebook 06: batched vs sequential serving, and (on a GPU) batching alone vs batching
    with CUDA graphs."""
    best_seq, best_bat = _best(sequential), _best(batched)
    factor = best_bat["requests_per_second"] / best_seq["requests_per_second"]
    cpu_mode = best_bat["utilization_source"] == "cpu-mode"
    lines = [
        f"Sequential serving peaked at {best_seq['requests_per_second']:.2f} req/s (concurrency "
        f"{best_seq['concurrency']}); batched serving reached {best_bat['requests_per_second']:.2f}"
        f" req/s at concurrency {best_bat['concurrency']} with "
        f"{best_bat['mean_batch_size']:.1f} requests per batch on average: {factor:.1f}x.",
        f"The seed's Phase 3 promise is 3x from sharing the GPU; batching on the same device "
        f"measured {factor:.1f}x, "
        + ("above that line." if factor > 3 else
           "not above that line. Batching gains about its batch size where a step costs the "
           "same for more requests, as on a GPU, which reads the weights once for all of them: "
           "there a higher concurrency (bigger batches) raises it. On a CPU each request in a "
           "batch adds its own compute to the step, which caps the gain."),
    ]
    lines += _same_concurrency(sequential, batched)
    lines += _lone_request(sequential, batched)
    if cpu_mode:
        lines.append(
            f"CPU mode: the server's worker was busy {_pct(best_seq['mean_util'])} sequential "
            f"vs {_pct(best_bat['mean_util'])} batched. That is the share of time a generation "
            "ran, not how much of a chip worked, so it says nothing about the seed's "
            f"{SEED_PHASE3_UTILIZATION} GPU utilization: what CPU mode shows is throughput, "
            "latency and batch sizes; utilization and SM activity need a GPU.")
    else:
        lines.append(
            f"Mean NVML utilization: {_pct(best_seq['mean_util'])} sequential (c="
            f"{best_seq['concurrency']}) vs {_pct(best_bat['mean_util'])} batched (c="
            f"{best_bat['concurrency']}); the seed's Phase 3 promise is "
            f"{SEED_PHASE3_UTILIZATION}.")
    if best_bat.get("sm_activity_mean") is not None:
        lines.append(f"SM activity: {_pct(best_seq.get('sm_activity_mean'))} sequential vs "
                     f"{_pct(best_bat['sm_activity_mean'])} batched: how much of the chip the "
                     "busy time used.")
    if eager:
        lines.append(_graphs_vs_eager(best_seq, batched, eager[-1]))
    return bullets(lines)


def _same_concurrency(sequential: list[dict], batched: list[dict]) -> list[str]:
    common = {r["concurrency"] for r in sequential} & {r["concurrency"] for r in batched}
    if not common:
        return []
    c = max(common)
    s = next(r for r in sequential if r["concurrency"] == c)
    b = next(r for r in batched if r["concurrency"] == c)
    return [f"At concurrency {c} (the highest level both ran): p95 {s['p95_ms']:.0f} ms "
            f"sequential vs {b['p95_ms']:.0f} ms batched; {s['requests_per_second']:.2f} vs "
            f"{b['requests_per_second']:.2f} req/s."]


def _lone_request(sequential: list[dict], batched: list[dict]) -> list[str]:
    """A lone request next to the queued ones: the server's generation time per request says
    whether the model itself ran slower, or the request waited."""
    lone = next((r for r in sequential if r["concurrency"] == 1), None)
    queued = [r for r in sequential if r["concurrency"] > 1 and r.get("generation_ms")]
    if lone is None or not lone.get("generation_ms") or not queued:
        return []
    others = statistics.fmean(r["generation_ms"] for r in queued)
    ratio = lone["generation_ms"] / others
    verdict = (f"the same within {LONE_SAME:.0%}: the model ran as fast for it as for queued "
               "requests, so a lone request pays no extra here" if abs(ratio - 1) <= LONE_SAME
               else f"more than {LONE_SAME:.0%} apart, so the model itself ran at a different "
               "speed at that level: eager decoding is launch-bound, so its speed follows the "
               "CPU's, which varies from run to run on a shared machine; queueing plays no part")
    lines = [f"A lone request (concurrency 1) took {lone['generation_ms']:.0f} ms of generation "
             f"against {others:.0f} ms per queued request at higher concurrency ({ratio:.2f}x): "
             f"{verdict}."]
    solo = next((r for r in batched if r["concurrency"] == 1), None)
    if solo is not None:
        lines.append(f"At concurrency 1 there is nothing to batch: p50 {lone['p50_ms']:.0f} ms "
                     f"sequential vs {solo['p50_ms']:.0f} ms batched; the batched server runs "
                     "its own decode loop (CUDA graphs on a GPU) instead of `generate`, and a "
                     "lone request waits up to --max-wait-ms for company.")
    return lines


def _graphs_vs_eager(best_seq: dict, batched: list[dict], eager: dict) -> str:
    graphs = next(r for r in batched if r["concurrency"] == eager["concurrency"])
    gain = graphs["requests_per_second"] / eager["requests_per_second"]
    return (f"At concurrency {eager['concurrency']}: batching alone gave "
            f"{eager['requests_per_second']:.2f} req/s "
            f"({eager['requests_per_second'] / best_seq['requests_per_second']:.1f}x sequential, "
            f"utilization {_pct(eager['mean_util'])}); with CUDA graphs "
            f"{graphs['requests_per_second']:.2f} req/s "
            + (f"({gain:.1f}x more, utilization {_pct(graphs['mean_util'])})." if gain > 1 else
               f"({gain:.1f}x, no faster; utilization {_pct(graphs['mean_util'])}): launching "
               "the kernels was not what held this batch back; compare the two runs' batch "
               "sizes (this comparison runs only on a GPU: CPU mode has no CUDA graphs)."))


# --- 07 -------------------------------------------------------------------------------------

def sharing(rows: list[dict], cpu_cores: int | None = None) -> str:
    """Notebook 07: several sequential servers on one device vs one batched server."""
    sequential = [r for r in rows if r["mode"] == "sequential"]
    batched = next(r for r in rows if r["mode"] != "sequential")
    one, best = sequential[0], _best(sequential)
    lines = [
        f"One sequential server: {one['requests_per_second']:.2f} req/s. Best with "
        f"{', '.join(str(r['servers']) for r in sequential)} servers sharing the device: "
        f"{best['requests_per_second']:.2f} req/s with {best['servers']} "
        f"({best['requests_per_second'] / one['requests_per_second']:.2f}x one server).",
        f"One {batched['mode']} server: {batched['requests_per_second']:.2f} req/s, "
        f"{batched['requests_per_second'] / best['requests_per_second']:.1f}x the best sharing "
        f"set-up, p95 {batched['p95_ms']:.0f} ms vs {best['p95_ms']:.0f} ms.",
    ]
    lines += _memory_growth(sequential)
    if batched.get("sm_activity_mean") is not None:
        lines.append(f"Utilization vs SM activity: {best['mean_util']:.0f} % / "
                     f"{best['sm_activity_mean']:.1f} % for {best['servers']} sequential "
                     f"servers, {batched['mean_util']:.0f} % / "
                     f"{batched['sm_activity_mean']:.1f} % batched.")
    elif batched.get("utilization_source") == "cpu-mode":
        lines.append("No GPU here: SM activity cannot be measured, and util % is the first "
                     f"server's busy share. This machine has {cpu_cores or 'several'} CPU cores: "
                     "separate server processes can run on separate cores at the same time, "
                     "which processes sharing one GPU by time-slicing cannot.")
    return bullets(lines)


MEMORY_PER_SERVER = 0.75  # of one server's memory, per server: each loads its own copy


def _memory_growth(sequential: list[dict]) -> list[str]:
    one, last = sequential[0], sequential[-1]
    on_gpu = last.get("gpu_memory_used_gb") is not None
    key, where = (("gpu_memory_used_gb", "GPU memory in use") if on_gpu
                  else ("server_rss_gb", "Resident memory of the servers"))
    if len(sequential) < 2 or last.get(key) is None or not one.get(key):
        return []
    growth = last[key] / one[key]
    text = (f"{where}: {last[key]:.2f} GB with {last['servers']} servers vs {one[key]:.2f} GB "
            f"with one ({growth:.1f}x, ")
    if growth > MEMORY_PER_SERVER * last["servers"]:
        what = "weights and CUDA context" if on_gpu else "runtime and weights"
        return [text + f"over {MEMORY_PER_SERVER:.0%} of the one-server figure per server): "
                f"every process loads its own {what}."]
    # Each process still loads its own copy: what is missing was counted once, or not at all.
    return [text + f"under {MEMORY_PER_SERVER:.0%} of the one-server figure per server): less "
            "than a copy per server was counted. "
            + ("NVML counts the whole card, so memory in use before the servers started (other "
               "processes, the driver) is in the one-server figure once, not per process."
               if on_gpu else
               "Resident memory leaves out pages the system swapped out or reclaimed, or that a "
               "server never touched; each process still holds its own runtime and weights.")]
