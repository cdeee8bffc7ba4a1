"""The seed's load test on a GPU, with an NVML timeline around it.

Starts `labkit serve` on a model (default synthetic:llama-3.2-3b), samples the GPU at 10 Hz
through an idle stretch, the load test (concurrency 5, 50 requests, 150 tokens) and another idle
stretch, then saves the timeline (PNG) and a JSON summary, and prints mean utilization, idle %,
SM and tensor activity during the load test and over the whole window, next to the seed's claim.

    PYTHONPATH=. python3 benchmarks/gpu_timeline.py [--idle 30] [--png PATH] [--json PATH]

Metric definitions: ARCHITECTURE.md ("Metric definitions") and labkit/measure/utilization.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from labkit.measure import loadtest  # noqa: E402
from labkit.measure.plots import plot_latency_distribution, plot_timeline, save  # noqa: E402
from labkit.measure.utilization import (  # noqa: E402
    CPU_MODE_LABEL,
    UtilizationSampler,  # noqa: E402
    loadtest_t0,
)
from labkit.serve.launcher import launch  # noqa: E402

SEED_CLAIM = "seed (A100, 3B model): 15-25 % mean utilization, 75-85 % idle"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="synthetic:llama-3.2-3b")
    p.add_argument("--concurrency", type=int, default=5)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=150)
    p.add_argument("--idle", type=float, default=30.0, help="idle seconds before and after")
    p.add_argument("--idle-before", type=float, default=None)
    p.add_argument("--idle-after", type=float, default=None)
    p.add_argument("--interval", type=float, default=0.1, help="sampling interval, s")
    p.add_argument("--png", default=str(REPO / "benchmarks" / "gpu_timeline_h100.png"))
    p.add_argument("--json", default=None, help="default: the PNG path with .json")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--max-seconds", type=int, default=0,
                   help="give up (cleanly) after this many seconds; 0 = no limit")
    args = p.parse_args(argv)
    args.idle_before = args.idle if args.idle_before is None else args.idle_before
    args.idle_after = args.idle if args.idle_after is None else args.idle_after
    args.json = args.json or str(Path(args.png).with_suffix(".json"))
    return args


def _fmt(value, spec: str = "5.1f", unit: str = " %") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a".rjust(7)
    return f"{value:{spec}}{unit}"


def print_table(phases: dict[str, dict], device: str, source: str) -> None:
    whole = phases["whole window"]
    what = "NVML" if source == "nvml" else CPU_MODE_LABEL
    print(f"\nTimeline on {device} ({what}), one sample every "
          f"{whole['duration_s'] / max(1, whole['samples'] - 1):.2f} s on average")
    print(f"{'window':<14}{'seconds':>8}{'samples':>9}{'mean util':>11}{'idle':>8}"
          f"{'SM act.':>9}{'tensor':>9}{'DRAM bw':>9}")
    for name, s in phases.items():
        idle = None if s["idle_fraction"] is None else 100 * s["idle_fraction"]
        print(f"{name:<14}{s['duration_s']:8.1f}{s['samples']:9d}{_fmt(s['mean_util']):>11}"
              f"{_fmt(idle, '4.0f'):>8}{_fmt(s.get('sm_activity_mean')):>9}"
              f"{_fmt(s.get('tensor_activity_mean')):>9}{_fmt(s.get('dram_bw_mean')):>9}")
    print("(util = NVML utilization.gpu: any kernel running, or in CPU mode the server's busy %; "
          f"idle = share of samples < 5 %; SM/tensor/DRAM = NVML GPM)\n{SEED_CLAIM}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.max_seconds:
        def give_up(*_):
            raise TimeoutError(f"gave up after --max-seconds {args.max_seconds}")
        signal.signal(signal.SIGALRM, give_up)
        signal.alarm(args.max_seconds)

    t_launch = time.perf_counter()
    print(f"starting labkit serve --model {args.model} ...", flush=True)
    with launch(model=args.model, port=None, timeout=args.startup_timeout) as srv:
        print(f"server ready at {srv.url} after {time.perf_counter() - t_launch:.1f} s",
              flush=True)
        # Without NVML this falls back to the server's busy % (CPU mode), labelled as such.
        sampler = UtilizationSampler(interval=args.interval, url=srv.url)
        if sampler.source != "nvml":
            print(f"no NVML on this machine: recording {CPU_MODE_LABEL}", flush=True)
        with sampler:
            print(f"idle {args.idle_before:g} s ...", flush=True)
            time.sleep(args.idle_before)
            load_start = time.perf_counter()
            sampler.mark("load test starts", load_start)
            print(f"load test: concurrency {args.concurrency}, {args.requests} requests, "
                  f"{args.max_tokens} tokens ...", flush=True)
            result = loadtest.run(srv.url, concurrency=args.concurrency, requests=args.requests,
                                  max_tokens=args.max_tokens, timeout=args.request_timeout,
                                  progress=False)
            load_end = time.perf_counter()
            sampler.mark("load test ends", load_end)
            print(f"idle {args.idle_after:g} s ...", flush=True)
            time.sleep(args.idle_after)
    signal.alarm(0)
    sampler.close()

    t0 = loadtest_t0(result, returned_at=load_end)
    sampler.add_requests(result, t0=t0)
    print(result.report())
    phases = {
        "idle before": sampler.summary(end=load_start),
        "load test": sampler.summary(start=load_start, end=load_end),
        # from 1 s after the last response: a utilization value covers the period before it
        "idle after": sampler.summary(start=load_end + 1.0),
        "whole window": sampler.summary(),
    }
    device = sampler.device_name
    print_table(phases, device, sampler.source)

    png = Path(args.png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig = plot_timeline(sampler.frame(), sampler.marks, model=args.model,
                        title=f"{args.model} on {device}: idle, seed load test (concurrency "
                              f"{args.concurrency}, {args.requests} requests, {args.max_tokens} "
                              "tokens), idle")
    save(fig, str(png))
    latencies = [r.latency_ms for r in result.ok_records]
    save(plot_latency_distribution(latencies, model=args.model, device=device),
         str(png.with_name(png.stem + "_latency.png")))
    summary = result.summary()
    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "source": sampler.source,
        "gpm": getattr(sampler.reader, "gpm_status", None),
        "power": getattr(sampler.reader, "power_kind", None),
        "model": args.model,
        "config": {k: v for k, v in vars(args).items() if k not in ("png", "json")},
        "phases": phases,
        "load_test": {k: summary[k] for k in ("total_requests", "successful", "failed",
                                              "latency_ms", "requests_per_sec",
                                              "requests_per_min", "output_tokens_per_sec",
                                              "queue_time_ms", "ttft_ms", "tpot_ms")},
        "request_spans_t0": "result.t0" if hasattr(result, "t0") else
                            "estimated: run() return time - last completion",
        "seed_claim": SEED_CLAIM,
    }
    Path(args.json).write_text(json.dumps(record, indent=2, default=str))
    sampler.frame().to_csv(png.with_suffix(".csv"), index=False)
    print(f"\nsaved {png}, {png.with_name(png.stem + '_latency.png')}, {args.json}, "
          f"{png.with_suffix('.csv')}")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
