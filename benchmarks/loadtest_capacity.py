"""How many requests per second can `labkit loadtest` drive from one process, and how late do
its requests leave? Measured against a trivial endpoint (tests/delay_server.py with no delay, in
its own process), so the load tester itself is what runs out of steam.

    python benchmarks/loadtest_capacity.py [--requests 6000] [--concurrency 1 8 32 64]
                                           [--json FILE]
    python benchmarks/loadtest_capacity.py --api openai [--chunks 50] [--chunk-delay 0.01]
                                           [--seconds 5] [--concurrency 32 128 512]
                                           [--workers 1 4] [--servers 4]

Target (issue 3): >= 1,500 req/s from one process. The CPU share of the client and of the
endpoint's process (CPU seconds / wall seconds) say which one ran out: near 100 % is the limit.

`--api openai` (issue 12): how many streamed chunks per second the client takes. The endpoint
streams `--chunks` chunks `--chunk-delay` s apart per request (delay_server.py's OpenAI mode, a
replay of SSE chunks with no model; `--servers K` runs K of them, used round-robin, so they are
not the limit), so `concurrency` streams offer concurrency / chunk-delay chunks/s; each row runs
about `--seconds`, once per `--workers` count (1 4: one process, then four). Where the client
keeps up, chunks/s matches the offer and the measured ITL the chunk delay; where it does not,
chunks/s falls short, ITL p99 grows and its event loop lags.
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


def measure_stream(urls: list[str], server_pids: list[int], concurrency: int, workers: int,
                   args) -> dict:
    run = dict(api="openai", model="delay-model", max_tokens=args.chunks, progress=False,
               workers=workers)
    warm = loadtest.run(urls, concurrency=concurrency, requests=2 * concurrency, **run)
    # as many requests as the warm-up's pace finishes in about args.seconds
    requests = max(2 * concurrency, round(args.seconds * warm.summary()["requests_per_sec"]))
    server_before = sum(process_cpu_s(pid) for pid in server_pids)
    cpu_before, wall_before = _client_cpu_s(), time.perf_counter()
    result = loadtest.run(urls, concurrency=concurrency, requests=requests, **run)
    cpu = _client_cpu_s() - cpu_before
    wall = time.perf_counter() - wall_before
    server_cpu = sum(process_cpu_s(pid) for pid in server_pids) - server_before
    s = result.summary()
    offered = concurrency / args.chunk_delay if args.chunk_delay else None
    return {
        "concurrency": concurrency, "workers": workers, "requests": requests,
        "successful": s["successful"], "requests_per_sec": s["requests_per_sec"],
        "chunks_per_sec": s["stream_chunks"] / s["total_time_s"],
        "offered_chunks_per_sec": offered, "ttft_p50_ms": s["ttft_ms"]["p50"],
        "itl_p50_ms": s["itl_ms"]["p50"], "itl_p99_ms": s["itl_ms"]["p99"],
        "send_lag_p99_ms": s["send_lag_ms"]["p99"],
        "loop_lag_p99_ms": s["client_loop_lag_ms"]["p99"],
        "client_saturated": s["client_saturated"], "client_cpu_share": cpu / wall,
        "server_cpu_share": server_cpu / wall,
    }


def _client_cpu_s() -> float:
    """This process's CPU seconds and its finished children's (the --workers processes)."""
    import resource

    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                          resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main_stream(args, machine: str) -> int:
    command = [sys.executable, str(DELAY_SERVER), "--api", "openai", "--delay", "0",
               "--chunks", str(args.chunks), "--chunk-delay", str(args.chunk_delay)]
    servers = [ServerProcess("streaming endpoint", command=command).start()
               for _ in range(args.servers)]
    try:
        for server in servers:
            server.wait_ready(60)
        urls = [server.url + "/v1" for server in servers]
        pids = [server.pid for server in servers]
        rows = [measure_stream(urls, pids, c, w, args)
                for c in args.concurrency or [32, 128, 512] for w in args.workers]
    finally:
        for server in servers:
            server.stop()
    print(f"labkit loadtest --api openai: streamed chunks the client takes, against "
          f"{args.servers} trivial OpenAI-style endpoint process(es) streaming {args.chunks} "
          f"chunks {args.chunk_delay * 1000:g} ms apart ({machine}; the same CPUs)")
    print(f"{'concurrency':>11} {'workers':>7} {'req/s':>7} {'chunks/s':>9} {'offered':>8} "
          f"{'TTFT p50':>8} {'ITL p50':>8} {'ITL p99':>8} {'loop p99':>8} {'client CPU':>10} "
          f"{'server CPU':>10}")
    for r in rows:
        offered = f"{r['offered_chunks_per_sec']:.0f}" if r["offered_chunks_per_sec"] else "-"
        print(f"{r['concurrency']:>11} {r['workers']:>7} {r['requests_per_sec']:>7.0f} "
              f"{r['chunks_per_sec']:>9.0f} {offered:>8} {r['ttft_p50_ms']:>8.2f} "
              f"{r['itl_p50_ms']:>8.2f} {r['itl_p99_ms']:>8.2f} {r['loop_lag_p99_ms']:>8.2f} "
              f"{100 * r['client_cpu_share']:>9.0f}% {100 * r['server_cpu_share']:>9.0f}%")
    for workers in args.workers:
        best = max((r for r in rows if r["workers"] == workers),
                   key=lambda r: r["chunks_per_sec"])
        print(f"{workers} worker(s): best {best['chunks_per_sec']:.0f} chunks/s "
              f"({best['requests_per_sec']:.0f} req/s) at concurrency {best['concurrency']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "api": "openai", "chunks": args.chunks,
                       "chunk_delay_s": args.chunk_delay, "servers": args.servers,
                       "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", choices=("generate", "openai"), default="generate")
    parser.add_argument("--requests", type=int, default=6000, help="generate: per row")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None,
                        help="default: 1 8 32 64 (generate), 32 128 512 (openai)")
    parser.add_argument("--chunks", type=int, default=50, help="openai: chunks per request")
    parser.add_argument("--chunk-delay", type=float, default=0.01,
                        help="openai: seconds between chunks (0: as fast as the server writes)")
    parser.add_argument("--seconds", type=float, default=5.0, help="openai: about, per row")
    parser.add_argument("--workers", type=int, nargs="+", default=[1],
                        help="openai: load-test processes, each a row (e.g. 1 4)")
    parser.add_argument("--servers", type=int, default=1,
                        help="openai: endpoint processes, used round-robin (so that they are "
                             "not the limit)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    if args.api == "openai":
        return main_stream(args, machine)

    command = [sys.executable, str(DELAY_SERVER), "--delay", "0"]
    server = ServerProcess("trivial endpoint", command=command).start().wait_ready(60)
    try:
        rows = [measure(server.url, server.pid, c, args.requests)
                for c in args.concurrency or [1, 8, 32, 64]]
    finally:
        server.stop()

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
