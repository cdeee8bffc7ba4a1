"""How many requests per second can `labkit loadtest` drive from one process, and how late do
its requests leave? Measured against a trivial endpoint (tests/delay_server.py with no delay, in
its own process), so the load tester itself is what runs out of steam.

    python benchmarks/loadtest_capacity.py [--requests 6000] [--concurrency 1 8 32 64]
                                           [--json FILE]

Target (issue 3): >= 1,500 req/s from one process. The CPU share of the client and of the
endpoint's process (CPU seconds / wall seconds) say which one ran out: near 100 % is the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from labkit.measure import loadtest
from labkit.serve.launcher import ServerProcess

TARGET_RPS = 1500


DELAY_SERVER = Path(__file__).resolve().parent.parent / "tests" / "delay_server.py"


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of another process (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, server_pid: int, concurrency: int, requests: int) -> dict:
    warmup = min(200, requests // 10)
    loadtest.run(url, concurrency=concurrency, requests=warmup, max_tokens=1, progress=False)
    server_before = process_cpu_s(server_pid)
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    result = loadtest.run(url, concurrency=concurrency, requests=requests, max_tokens=1,
                          progress=False)
    cpu = time.process_time() - cpu_before
    wall = time.perf_counter() - wall_before
    server_cpu = process_cpu_s(server_pid) - server_before
    s = result.summary()
    return {
        "concurrency": concurrency, "requests": requests, "successful": s["successful"],
        "requests_per_sec": s["requests_per_sec"], "latency_p50_ms": s["latency_ms"]["p50"],
        "latency_p99_ms": s["latency_ms"]["p99"], "send_lag_p50_ms": s["send_lag_ms"]["p50"],
        "send_lag_p99_ms": s["send_lag_ms"]["p99"], "client_cpu_share": cpu / wall,
        "server_cpu_share": server_cpu / wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    command = [sys.executable, str(DELAY_SERVER), "--delay", "0"]
    server = ServerProcess("trivial endpoint", command=command).start().wait_ready(60)
    try:
        rows = [measure(server.url, server.pid, c, args.requests) for c in args.concurrency]
    finally:
        server.stop()

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"labkit loadtest capacity against a trivial aiohttp endpoint ({machine}; the server "
          "runs in a second process on the same CPUs)")
    print(f"{'concurrency':>11} {'requests':>8} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'lag p50':>8} {'lag p99':>8} {'client CPU':>10} {'server CPU':>10}")
    for r in rows:
        print(f"{r['concurrency']:>11} {r['successful']:>8} {r['requests_per_sec']:>8.0f} "
              f"{r['latency_p50_ms']:>7.2f} {r['latency_p99_ms']:>7.2f} "
              f"{r['send_lag_p50_ms']:>8.3f} {r['send_lag_p99_ms']:>8.3f} "
              f"{100 * r['client_cpu_share']:>9.0f}% {100 * r['server_cpu_share']:>9.0f}%")
    best = max(rows, key=lambda r: r["requests_per_sec"])
    verdict = "meets" if best["requests_per_sec"] >= TARGET_RPS else "MISSES"
    print(f"best: {best['requests_per_sec']:.0f} req/s at concurrency {best['concurrency']} "
          f"({verdict} the {TARGET_RPS} req/s target)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "target_rps": TARGET_RPS, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if best["requests_per_sec"] >= TARGET_RPS else 1


if __name__ == "__main__":
    sys.exit(main())
