"""`labkit serve --mode continuous` over HTTP against the same engine in-process, same run.

1. In-process: the continuous engine keeps --concurrency requests in flight (a new one is added
   as each finishes: a closed loop, like the load tester's) until --requests have run; output
   tokens per second over that window, with NVML utilization and GPM SM activity. The engine
   does what it does in the server's engine process: graphs captured first, token ids in and
   out (the text work is the server's).
2. Over HTTP: `labkit serve --mode continuous` with the same model, cache and batch cap, under
   `labkit loadtest` (closed loop, same concurrency, prompt and max_tokens, greedy, ignore_eos);
   output tokens per second, latency, and the same GPU readings over the load test's window.
   Twice: the engine in its own process (the default), and on a thread of the server
   (`--no-engine-process`), where it shares the event loop's GIL.

The ratio HTTP ÷ in-process is the serving overhead (event loop, JSON, and on a thread the GIL).
Every figure is measured here, in this run.

    python benchmarks/continuous_serving.py [--model synthetic:llama-3.2-3b] [--concurrency 256]
        [--requests 1024] [--max-tokens 150] [--kv-cache-gb 24] [--api generate|openai]
        [--engine process thread] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import time

import torch

from labkit.engine import hf_generate
from labkit.engine.continuous import ContinuousEngine
from labkit.engine.kv_cache import PagedKVCache
from labkit.engine.llama import Llama
from labkit.engine.model import load_model, synchronize
from labkit.engine.request import Request
from labkit.measure import loadtest, utilization
from labkit.serve import client
from labkit.serve.backend import WARMUP_GRAPH_PAGES
from labkit.serve.launcher import launch


def closed_loop(engine: ContinuousEngine, concurrency: int, total: int, max_tokens: int,
                prompt: str) -> tuple[int, float]:
    """Keep `concurrency` requests in the engine until `total` have finished: (tokens, seconds).
    The prompt is tokenized once, here, as the server tokenizes outside the engine process."""
    done, sent, tokens = [0], [0], [0]
    prompt_ids = hf_generate.tokenize(engine.lm, Request(prompt, max_tokens))

    def send() -> None:
        sent[0] += 1
        engine.add(Request(prompt, max_tokens, 0.0, ignore_eos=True,
                           prompt_ids=list(prompt_ids)), finished)

    def finished(result) -> None:
        done[0] += 1
        tokens[0] += result.tokens_generated
        if sent[0] < total:
            send()

    synchronize(engine.lm.device)
    started = time.perf_counter()
    for _ in range(concurrency):
        send()
    while engine.has_work():
        engine.step()
    return tokens[0], time.perf_counter() - started


def in_process(args, sampler) -> dict:
    lm = load_model(args.model, device="cuda", dtype="bf16")
    cache = PagedKVCache.sized(lm.config, args.kv_cache_gb, lm.dtype, lm.device)
    engine = ContinuousEngine(lm, Llama.from_hf(lm.model, free_source=True), cache,
                              max_running=args.concurrency)
    # As in the engine process: the server's graphs, and token ids out (the server decodes).
    engine.runner.capture_all(args.concurrency, WARMUP_GRAPH_PAGES)
    engine.detokenize = False
    closed_loop(engine, args.concurrency, args.concurrency, 8, loadtest.DEFAULT_PROMPT)  # warm
    before = engine.stats()
    started = time.perf_counter()
    tokens, seconds = closed_loop(engine, args.concurrency, args.requests, args.max_tokens,
                                  loadtest.DEFAULT_PROMPT)
    util = sampler.summary(start=started, end=time.perf_counter())
    row = {"where": "in-process", "output_tokens": tokens, "seconds": round(seconds, 3),
           "tok_s": round(tokens / seconds, 1), "nvml_util": util.get("mean_util"),
           "sm_activity": util.get("sm_activity_mean"),
           **engine_window(before, engine.stats(), seconds)}
    del engine, cache, lm
    gc.collect()
    torch.cuda.empty_cache()
    return row


def over_http(args, sampler, engine_process: bool) -> dict:
    flags = ["--max-batch-size", str(args.concurrency), "--kv-cache-gb", str(args.kv_cache_gb),
             "--engine-process" if engine_process else "--no-engine-process"]
    with launch(args.model, mode="continuous", max_tokens_limit=args.max_tokens,
                extra_args=flags, timeout=600) as srv:
        url = srv.url + ("/v1/completions" if args.api == "openai" else "/generate")
        loadtest.run(url, args.concurrency, args.concurrency, max_tokens=8, temperature=0.0,
                     progress=False, api=args.api)  # warm (synthetic models never stop early)
        before = client.get(srv.url + "/stats").body["server"]
        started = time.perf_counter()
        result = loadtest.run(url, args.concurrency, args.requests, max_tokens=args.max_tokens,
                              temperature=0.0, progress=False, api=args.api)
        seconds = time.perf_counter() - started
        util = sampler.summary(start=started, end=time.perf_counter())
        server = client.get(srv.url + "/stats").body["server"]
    s = result.summary()
    where = "HTTP, engine process" if engine_process else "HTTP, engine thread"
    return {"where": where, "output_tokens": s["output_tokens"],
            "tok_s": s["output_tokens_per_sec"], "req_s": s["requests_per_sec"],
            "success_rate": s["success_rate"], "p50_ms": s["latency_ms"]["p50"],
            "p95_ms": s["latency_ms"]["p95"], "nvml_util": util.get("mean_util"),
            "sm_activity": util.get("sm_activity_mean"),
            **engine_window(before, server, seconds)}


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
    parser.add_argument("--api", choices=["generate", "openai"], default="generate",
                        help="openai: streamed /v1/completions, every token sent as it comes")
    parser.add_argument("--engine", nargs="+", choices=["process", "thread"],
                        default=["process", "thread"], help="the HTTP servers to run")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    card = torch.cuda.get_device_name(0)
    sampler = utilization.UtilizationSampler(interval=0.05).start()
    rows = [in_process(args, sampler)] + [
        over_http(args, sampler, engine_process=engine == "process") for engine in args.engine]
    sampler.stop()
    ratios = {engine: row["tok_s"] / rows[0]["tok_s"]
              for engine, row in zip(args.engine, rows[1:], strict=True)}
    report = {"card": card, "date": datetime.date.today().isoformat(), "model": args.model,
              "concurrency": args.concurrency, "requests": args.requests, "api": args.api,
              "max_tokens": args.max_tokens, "rows": rows,
              **{f"{engine}_over_in_process": ratio for engine, ratio in ratios.items()}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(f"\n{card}, {args.model}, concurrency {args.concurrency}, {args.requests} requests "
          f"of {args.max_tokens} tokens, greedy")
    print(f"{'where':<22}{'tok/s':>10}{'util %':>8}{'SM %':>7}{'tok/step':>10}"
          f"{'GPU wait':>10}{'capture s':>11}")
    for row in rows:
        print(f"{row['where']:<22}{row['tok_s']:>10.0f}{row['nvml_util'] or 0:>8.1f}"
              f"{row['sm_activity'] or 0:>7.1f}{row['tokens_per_step']:>10.1f}"
              f"{row['device_wait_share']:>10.2f}{row['graph_capture_s']:>11.2f}")
    for engine, ratio in ratios.items():
        print(f"HTTP, engine {engine} / in-process: {ratio:.2f} (target >= 0.60)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
