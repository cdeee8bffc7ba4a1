"""Sequential vs batched serving of the same closed-loop load: `labkit serve --mode sequential`
and `--mode batched` on the same machine, in the same run, at concurrency 1, 4, 16, 32, 64.

Each row is one `labkit.course.experiments.measure`: requests/s and output tokens/s (successful
requests and their `tokens_generated` ÷ wall time from the first send to the last completion),
client-side p50/p95 latency, and over that load test's window the mean NVML utilization and GPM
SM activity (on a CPU: the server's busy share from /stats, and no SM activity). Sequential
throughput does not grow with concurrency (one generation at a time), so sequential levels stop
at --sequential-max-concurrency and run one round (max(4, concurrency) requests); batched levels
run two rounds (2 × concurrency requests, at least 4), so each level sees batches re-formed from
returning clients. Batched servers get --max-wait-ms 50 (see labkit/experiments.py for why).
Levels not started within --max-seconds (shared: sequential levels start only in the first 45 %
of it) are skipped and listed; the first level of each mode always runs.

The last lines compare batched throughput at concurrency 32 with the best sequential throughput
and mean utilization at concurrency 32 with issue 6's targets (≥ 10×, ≥ 80 %).

    python benchmarks/serving.py [--model synthetic:llama-3.2-3b] [--max-tokens 150]
        [--levels 1 4 16 32 64] [--sequential-max-concurrency 16] [--max-seconds 330]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

from labkit.course import experiments, notebook
from labkit.measure import gpu

TARGET_SPEEDUP = 10.0
TARGET_UTIL_PCT = 80.0
TARGET_CONCURRENCY = 32
MIN_REQUESTS = 4
BATCHED_SHARE = 0.55  # of --max-seconds, kept for the batched sweep


def card() -> str:
    info = gpu.device_info()
    if info["gpu_name"] is None:
        return f"CPU only ({os.cpu_count()} cores), no GPU"
    return f"{info['gpu_name']} (driver {info['driver_version']}, CUDA {info['cuda_version']})"


def verdict(rows: list[dict]) -> list[str]:
    """The comparison with issue 6's targets, from measured rows only."""
    sequential = [r for r in rows if r["mode"] == "sequential"]
    at_target = [r for r in rows if r["mode"] == "batched"
                 and r["concurrency"] == TARGET_CONCURRENCY]
    if not sequential or not at_target:
        return [f"no comparison: the run has no sequential row or no batched row at "
                f"concurrency {TARGET_CONCURRENCY}"]
    best = max(sequential, key=lambda r: r["requests_per_second"])
    batched = at_target[0]
    speedup = batched["requests_per_second"] / best["requests_per_second"]
    tokens = batched["output_tokens_per_sec"] / best["output_tokens_per_sec"]
    util = batched["mean_util"]
    what = ("NVML utilization" if batched["utilization_source"] != "cpu-mode"
            else "server busy share (CPU mode, not a GPU figure)")
    lines = [
        f"batched at concurrency {TARGET_CONCURRENCY}: {batched['requests_per_second']:.2f} req/s"
        f" = {speedup:.1f}x the best sequential ({best['requests_per_second']:.2f} req/s at "
        f"concurrency {best['concurrency']}); output tokens/s {tokens:.1f}x. Target >= "
        f"{TARGET_SPEEDUP:g}x: {'met' if speedup >= TARGET_SPEEDUP else 'NOT met'}.",
    ]
    if util is None:
        lines.append("mean utilization at concurrency 32: not measured")
    else:
        lines.append(f"mean {what} at concurrency {TARGET_CONCURRENCY}: {util:.1f} %. Target >= "
                     f"{TARGET_UTIL_PCT:g} %: {'met' if util >= TARGET_UTIL_PCT else 'NOT met'}.")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model source (default: synthetic:llama-3.2-3b on a GPU, "
                        "the embedded model on the CPU)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--sequential-max-concurrency", type=int, default=16,
                        help="highest sequential level (its throughput is flat; default 16)")
    parser.add_argument("--max-tokens", type=int, default=150)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=330.0,
                        help="time budget: levels not started by then are skipped (default 330)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if min(args.levels) < 1 or args.max_tokens < 1 or args.max_seconds <= 0:
        parser.error("--levels and --max-tokens must be at least 1, --max-seconds positive")

    began = time.perf_counter()
    model = args.model or notebook.default_model()
    where = card()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"{where} | {date} | model {model} | {args.max_tokens} tokens per request")
    sequential_levels = [c for c in args.levels if c <= args.sequential_max_concurrency]
    plan = {"sequential": (sequential_levels, 1, began + (1 - BATCHED_SHARE) * args.max_seconds),
            "batched": (args.levels, 2, began + args.max_seconds)}
    rows: list[dict] = []
    name = model
    def progress(r: dict) -> None:
        print(f"  {r['mode']} c={r['concurrency']}: {r['requests_per_second']:.2f} req/s, "
              f"mean batch {r['mean_batch_size'] or 0:.1f} ({time.perf_counter() - began:.0f} s)",
              flush=True)

    for mode, (levels, rounds, deadline) in plan.items():
        if not levels:
            continue
        sweep = experiments.sweep(model, mode, levels, rounds=rounds, min_requests=MIN_REQUESTS,
                                  max_tokens=args.max_tokens, max_batch_size=args.max_batch_size,
                                  deadline=deadline, on_row=progress)
        rows += sweep.rows
        name = sweep.model
    skipped = [(mode, c) for mode, (levels, _, _) in plan.items() for c in levels
               if not any(r["mode"] == mode and r["concurrency"] == c for r in rows)]

    print(f"\n{where}, {name}, {date}\n")
    print(experiments.table(rows))
    if skipped:
        print(f"\nskipped (--max-seconds {args.max_seconds:g} reached): "
              + ", ".join(f"{m} c={c}" for m, c in skipped))
    lines = verdict(rows)
    total_s = time.perf_counter() - began
    print(f"\ntotal {total_s:.0f} s\n" + "\n".join(lines))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"date": date, "card": where, "model": name, "source": model,
                       "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size,
                       "max_wait_ms": experiments.SWEEP_MAX_WAIT_MS, "rows": rows,
                       "skipped": skipped, "verdict": lines, "total_s": round(total_s, 1)},
                      fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
