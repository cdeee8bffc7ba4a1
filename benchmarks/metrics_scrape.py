"""How long a GET /metrics scrape takes while `labkit serve` is under load (issue 12's target:
under 5 ms). One server, a closed-loop load test on a thread of this process, and scrapes
timed from send to the last byte in between.

    python benchmarks/metrics_scrape.py --model model --mode batched --scrapes 200
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import urllib.request

import numpy as np

from labkit.measure import gpu, loadtest
from labkit.serve.launcher import launch


def scrape_ms(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        response.read()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="model")
    parser.add_argument("--mode", default="batched")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between scrapes")
    args = parser.parse_args()
    with launch(model=args.model, mode=args.mode) as srv:
        idle = [scrape_ms(srv.url) for _ in range(20)]
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                loadtest.run(srv.url, concurrency=args.concurrency, requests=args.concurrency,
                             max_tokens=64, progress=False)

        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        time.sleep(2.0)  # the queue fills
        loaded = []
        for _ in range(args.scrapes):
            loaded.append(scrape_ms(srv.url))
            time.sleep(args.interval)
        stop.set()
        worker.join()
    where = gpu.device_info()["gpu_name"] or "CPU"
    print(f"labkit serve --model {args.model} --mode {args.mode} on {where}, "
          f"concurrency {args.concurrency}")
    for name, times in [("idle", idle), ("under load", loaded)]:
        p50, p99 = np.percentile(times, [50, 99])
        print(f"{name:<11} {len(times):>4} scrapes: p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
              f"max {max(times):.2f} ms, mean {statistics.fmean(times):.2f} ms")


if __name__ == "__main__":
    main()
