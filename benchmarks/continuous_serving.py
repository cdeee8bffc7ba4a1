"""`labkit serve --mode continuous` over HTTP against the same engine in-process, same run.

1. In-process: the continuous engine keeps --concurrency requests in flight (a new one is added
   as each finishes: a closed loop, like the load tester's) until --requests have run; output
   tokens per second over that window, the mean decode step (TPOT), NVML utilization and GPM
   SM activity. The engine does what it does in the server's engine process: graphs captured
   first, token ids in and out (the text work is the server's). Once per --temperature.
2. Over HTTP: `labkit serve --mode continuous` with the same model, cache and batch cap, under
   `labkit loadtest` (closed loop, same concurrency, prompt and max_tokens, ignore_eos), once
   per --api and --temperature against one server; streamed runs from --workers processes, so
   the client is not the limit (its event-loop lag is recorded). Output tokens per second,
   latency, ITL, and the same GPU readings over each load test's window. For each --engine:
   in its own process (the default), or on a thread of the server (`--no-engine-process`);
   for each --api-servers N, N API-server processes in front of that engine process.

The ratio HTTP ÷ in-process (same temperature) is the serving overhead; ITL p50 over the
in-process step says how much each token waits in the server. Every figure is measured here.

    python benchmarks/continuous_serving.py [--model synthetic:llama-3.2-3b] [--concurrency 256]
        [--requests 1024] [--max-tokens 150] [--kv-cache-gb 24] [--api generate openai]
        [--temperature 0 0.7] [--workers 4] [--engine process thread] [--api-servers 1 4]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import shutil
import subprocess
import threading
import time

import torch

from labkit.engine import text
from labkit.engine.continuous import WARMUP_GRAPH_PAGES, ContinuousEngine
from labkit.engine.kv_cache import PagedKVCache
from labkit.engine.llama import Llama
from labkit.engine.model import load_model, synchronize
from labkit.engine.request import Request
from labkit.measure import loadtest, utilization
from labkit.serve import client
from labkit.serve.launcher import launch


def closed_loop(engine: ContinuousEngine, concurrency: int, total: int, max_tokens: int,
                prompt: str, temperature: float = 0.0, tpots: list | None = None
                ) -> tuple[int, float]:
    """Keep `concurrency` requests in the engine until `total` have finished: (tokens, seconds).
    The prompt is tokenized once, here, as the server tokenizes outside the engine process.
    Each result's TPOT goes to `tpots`."""
    done, sent, tokens = [0], [0], [0]
    prompt_ids = text.tokenize(engine.lm, Request(prompt, max_tokens))

    def send() -> None:
        sent[0] += 1
        engine.add(Request(prompt, max_tokens, temperature, seed=sent[0], ignore_eos=True,
                           prompt_ids=list(prompt_ids)), finished)

    def finished(result) -> None:
        done[0] += 1
        tokens[0] += result.tokens_generated
        if tpots is not None and result.time_per_output_token_ms is not None:
            tpots.append(result.time_per_output_token_ms)
        if sent[0] < total:
            send()

    synchronize(engine.lm.device)
    started = time.perf_counter()
    for _ in range(concurrency):
        send()
    while engine.has_work():
        engine.step()
    return tokens[0], time.perf_counter() - started


def in_process(args, sampler) -> list[dict]:
    lm = load_model(args.model, device="cuda", dtype="bf16")
    cache = PagedKVCache.sized(lm.config, args.kv_cache_gb, lm.dtype, lm.device)
    engine = ContinuousEngine(lm, Llama.from_hf(lm.model, free_source=True), cache,
                              max_running=args.concurrency)
    # As in the engine process: the server's graphs, and token ids out (the server decodes).
    engine.runner.capture_all(args.concurrency, WARMUP_GRAPH_PAGES)
    engine.detokenize = False
    for temperature in args.temperature:  # warm: the sampling kernel compiles at its first call
        closed_loop(engine, args.concurrency, args.concurrency, 8, loadtest.DEFAULT_PROMPT,
                    temperature)
    rows = []
    for temperature in args.temperature:
        before, tpots = engine.stats(), []
        started = time.perf_counter()
        tokens, seconds = closed_loop(engine, args.concurrency, args.requests, args.max_tokens,
                                      loadtest.DEFAULT_PROMPT, temperature, tpots)
        util = sampler.summary(start=started, end=time.perf_counter())
        rows.append({"where": "in-process", "api": None, "temperature": temperature,
                     "output_tokens": tokens, "seconds": round(seconds, 3),
                     "tok_s": round(tokens / seconds, 1),
                     "tpot_ms_mean": round(sum(tpots) / len(tpots), 3),
                     "nvml_util": util.get("mean_util"),
                     "sm_activity": util.get("sm_activity_mean"),
                     **engine_window(before, engine.stats(), seconds)})
        print(rows[-1], flush=True)
    del engine, cache, lm
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def over_http(args, sampler, engine_process: bool, api_servers: int = 1) -> list[dict]:
    flags = ["--max-batch-size", str(args.concurrency), "--kv-cache-gb", str(args.kv_cache_gb),
             "--engine-process" if engine_process else "--no-engine-process"]
    if engine_process:  # always said: left out, a GPU server picks its own count
        flags += ["--api-servers", str(api_servers)]
    where = "HTTP, engine " + ("process" if engine_process else "thread") + (
        f", {api_servers} API servers" if api_servers > 1 else "")
    rows = []
    with launch(args.model, mode="continuous", max_tokens_limit=args.max_tokens,
                extra_args=flags, timeout=600) as srv:
        for api in args.api:
            url = srv.url + ("/v1/completions" if api == "openai" else "/generate")
            options = dict(api=api, progress=False,
                           workers=args.workers if api == "openai" else 1,
                           ignore_eos=api == "openai")
            loadtest.run(url, args.concurrency, 2 * args.concurrency, max_tokens=8,
                         temperature=0.0, **options)  # warm: connections, workers
            for temperature in args.temperature:
                before = client.get(srv.url + "/stats").body["server"]
                histograms_before = server_histograms(srv.url)
                trace = StatsTrace(srv.url).start()
                spy = py_spy(args.py_spy, srv.pid, f"{api}_{temperature:g}")
                result = loadtest.run(url, args.concurrency, args.requests,
                                      max_tokens=args.max_tokens, temperature=temperature,
                                      **options)
                trace.stop()
                if spy is not None:
                    spy.wait(timeout=60)
                # The load's own window, first send to last answer: with --workers, run()
                # also spends seconds starting its processes, while the GPU waits.
                spans = utilization.request_spans(result)
                started, ended = min(s for s, _ in spans), max(e for _, e in spans)
                seconds = ended - started
                util = sampler.summary(start=started, end=ended)
                if api_servers > 1:  # the others' counters reach this one every 0.25 s
                    time.sleep(0.6)
                server = client.get(srv.url + "/stats").body["server"]
                s = result.summary()
                rows.append({
                    "where": where, "api_servers": api_servers, "api": api,
                    "temperature": temperature, "workers": s["workers"],
                    "output_tokens": s["output_tokens"], "tok_s": s["output_tokens_per_sec"],
                    "req_s": s["requests_per_sec"], "success_rate": s["success_rate"],
                    "p50_ms": s["latency_ms"]["p50"], "p95_ms": s["latency_ms"]["p95"],
                    "itl_ms_p50": s["itl_ms"]["p50"], "tpot_ms_mean": s["tpot_ms"]["mean"],
                    "client_loop_lag_ms": s["client_loop_lag_ms"],
                    "client_saturated": s["client_saturated"],
                    "nvml_util": util.get("mean_util"),
                    "sm_activity": util.get("sm_activity_mean"),
                    **engine_window(before, server, seconds),
                    **where_requests_were(trace, spans, started, ended),
                    **where_time_went(result, histograms_before, server_histograms(srv.url))})
                print(rows[-1], flush=True)
    return rows


class StatsTrace:
    """/stats read every 10 ms during a load: how many requests the engine ran and held
    waiting at each reading (the rest of the client's in-flight requests were in transit:
    in the client, the server or the pipe)."""

    def __init__(self, url: str, every_s: float = 0.01):
        self.url, self.every_s, self.readings = url, every_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def start(self) -> StatsTrace:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(self.every_s):
            server = client.get(self.url + "/stats").body["server"]
            self.readings.append((time.perf_counter(), server["running"], server["waiting"]))


def where_requests_were(trace: StatsTrace, spans, started: float, ended: float) -> dict:
    """Mean requests in flight at the client (from its own send and answer times), running in
    the engine and waiting for it, over the load's window (perf_counter on one machine)."""
    inside = [r for r in trace.readings if started <= r[0] <= ended]
    if not inside:
        return {}
    client_mean = sum(min(e, ended) - max(s, started) for s, e in spans) / (ended - started)
    running = sum(r[1] for r in inside) / len(inside)
    waiting = sum(r[2] for r in inside) / len(inside)
    return {"client_in_flight_mean": round(client_mean, 1),
            "engine_running_mean": round(running, 1), "engine_waiting_mean": round(waiting, 1),
            "in_transit_mean": round(client_mean - running - waiting, 1)}


def server_histograms(url: str) -> dict:
    """(sum, count) of each of the server's latency histograms, from GET /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get(url + "/metrics").body
    found = {}
    for family in text_string_to_metric_families(text):
        if family.type == "histogram" and family.name.startswith("labkit_"):
            values = {s.name.rsplit("_", 1)[-1]: s.value for s in family.samples
                      if s.name.endswith(("_sum", "_count"))}
            found[family.name] = (values.get("sum", 0.0), values.get("count", 0.0))
    return found


def where_time_went(result, before: dict, after: dict) -> dict:
    """Mean ms per request over the load: as the client saw it (send to last byte, and to the
    first token) and as the server did (received to answered, queued, to first token)."""
    means = {}
    for name, (total, count) in after.items():
        old_total, old_count = before.get(name, (0.0, 0.0))
        if count > old_count:
            short = name.removeprefix("labkit_").removesuffix("_seconds")
            means[f"server_{short}_ms_mean"] = round(1000 * (total - old_total)
                                                     / (count - old_count), 2)
    records = [r for r in result.records if r.error is None]
    means["client_latency_ms_mean"] = round(sum(r.latency_ms for r in records)
                                            / max(len(records), 1), 2)
    ttfts = [r.ttft_ms for r in records if r.ttft_ms is not None]
    if ttfts:
        means["client_ttft_ms_mean"] = round(sum(ttfts) / len(ttfts), 2)
    return means


def py_spy(directory: str | None, pid: int, name: str) -> subprocess.Popen | None:
    """Sample the server and its engine process for 10 s with py-spy (raw stacks per thread),
    if asked and installed; without blocking them (--nonblocking)."""
    if not directory or not shutil.which("py-spy"):
        return None
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--subprocesses",
                             "--nonblocking", "--threads", "-r", "200", "-d", "8", "-f", "raw",
                             "-o", f"{directory}/{name}.txt"],
                            stdout=open(f"{directory}/{name}.log", "w"), stderr=subprocess.STDOUT)


def engine_window(before: dict, after: dict, seconds: float) -> dict:
    """The engine's own counters over the timed window: decode tokens per step, the share of
    the window its thread waited for the GPU (near 1: the GPU is the bottleneck), and the time
    spent capturing CUDA graphs of shapes first met in the window."""
    steps = after["decode_steps"] - before["decode_steps"]
    return {"tokens_per_step": round((after["decode_tokens"] - before["decode_tokens"])
                                     / max(steps, 1), 1),
            "decode_steps": steps,
            "device_wait_share": round((after["device_wait_s"] - before["device_wait_s"])
                                       / seconds, 3),
            "graph_capture_s": round(after["graph_capture_s"] - before["graph_capture_s"], 3),
            "graphs_captured": {  # the shapes first met in the window
                kind: [shape for shape in after[kind] if shape not in before[kind]]
                for kind in ("cuda_graph_shapes", "prefill_graph_shapes")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:llama-3.2-3b")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=150)
    parser.add_argument("--kv-cache-gb", type=float, default=24.0)
    parser.add_argument("--api", nargs="+", choices=["generate", "openai"],
                        default=["generate", "openai"],
                        help="openai: streamed /v1/completions, every token sent as it comes")
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.0, 0.7],
                        help="each run's temperature (0 = greedy; the seed's default is 0.7)")
    parser.add_argument("--workers", type=int, default=4,
                        help="load-test processes for the streamed runs (default 4)")
    parser.add_argument("--engine", nargs="+", choices=["process", "thread"],
                        default=["process"], help="the HTTP servers to run")
    parser.add_argument("--api-servers", type=int, nargs="+", default=[1], metavar="N",
                        help="a server for each N of `labkit serve --api-servers N` (engine "
                             "process only): API-server processes in front of the one engine")
    parser.add_argument("--json", default=None)
    parser.add_argument("--py-spy", default=None, metavar="DIR",
                        help="sample the server with py-spy during each HTTP load (raw stacks)")
    args = parser.parse_args(argv)

    card = torch.cuda.get_device_name(0)
    sampler = utilization.UtilizationSampler(interval=0.05).start()
    engine_rows = in_process(args, sampler)
    http_rows = [row for engine in args.engine for servers in args.api_servers
                 for row in over_http(args, sampler, engine_process=engine == "process",
                                      api_servers=servers if engine == "process" else 1)]
    sampler.stop()
    base = {row["temperature"]: row for row in engine_rows}
    greedy = base.get(0.0, engine_rows[0])
    for row in engine_rows + http_rows:
        row["x_in_process"] = round(row["tok_s"] / base[row["temperature"]]["tok_s"], 3)
        row["x_in_process_greedy"] = round(row["tok_s"] / greedy["tok_s"], 3)
        if row.get("itl_ms_p50") is not None:
            row["itl_over_step"] = round(row["itl_ms_p50"] / base[row["temperature"]]
                                         ["tpot_ms_mean"], 3)
    report = {"card": card, "date": datetime.date.today().isoformat(), "model": args.model,
              "concurrency": args.concurrency, "requests": args.requests,
              "max_tokens": args.max_tokens, "rows": engine_rows + http_rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(f"\n{card}, {args.model}, concurrency {args.concurrency}, {args.requests} requests "
          f"of {args.max_tokens} tokens; x: over in-process at the same temperature")
    print(f"{'where':<36}{'api':>9}{'T':>5}{'tok/s':>9}{'x':>7}{'util %':>8}{'SM %':>7}"
          f"{'ITL p50':>9}{'ITL/step':>9}{'GPU wait':>9}{'lag p99':>8}")
    for row in engine_rows + http_rows:
        lag = (row.get("client_loop_lag_ms") or {}).get("p99")
        print(f"{row['where']:<36}{row['api'] or '-':>9}{row['temperature']:>5g}"
              f"{row['tok_s']:>9.0f}{row['x_in_process']:>7.2f}{row['nvml_util'] or 0:>8.1f}"
              f"{row['sm_activity'] or 0:>7.1f}{_num(row.get('itl_ms_p50')):>9}"
              f"{_num(row.get('itl_over_step')):>9}{row['device_wait_share']:>9.2f}"
              f"{_num(lag):>8}")
    print(f"\n{'where':<36}{'api':>9}{'T':>5}{'client':>8}{'running':>8}{'waiting':>8}"
          f"{'transit':>8}   (mean requests in flight over the load's window)")
    for row in http_rows:
        if "client_in_flight_mean" in row:
            print(f"{row['where']:<36}{row['api']:>9}{row['temperature']:>5g}"
                  f"{row['client_in_flight_mean']:>8.1f}{row['engine_running_mean']:>8.1f}"
                  f"{row['engine_waiting_mean']:>8.1f}{row['in_transit_mean']:>8.1f}")
    for row in http_rows:
        print(row["api_servers"], row["api"], row["temperature"], {k: v for k, v in row.items()
                                               if k.endswith("_ms_mean") and k != "tpot_ms_mean"})
    print("targets: HTTP >= 0.85x in-process at the same temperature, util >= 90 %, "
          "SM >= 70 %, ITL p50 <= 1.15x the engine's step")
    return 0


def _num(value) -> str:
    return "-" if value is None or value != value else f"{value:.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
