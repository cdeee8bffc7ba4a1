"""Why is a lone request to the sequential server slower than queued ones? Splits each request's
client-side latency into the server's generation time, the rest of its time in the server, and
the time outside the server (network, the client's own event loop), under four conditions:

  c=1            one client, nothing else running in this process
  c=4            four clients: requests queue, the server never waits for the next one
  c=1 + plot     one client while a live timeline redraws in this process (notebooks 05, 06)
  c=1 + busy     one client while another thread of this process runs pure Python (GIL)

    python benchmarks/lone_request.py --model synthetic:llama-3.2-3b --json out.json

Every figure is measured here; the table says which card.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

from labkit.measure import gpu, loadtest, plots, utilization
from labkit.serve.launcher import launch


def split(result) -> dict:
    """Per-request means of where the client's latency went."""
    ok = result.ok_records
    mean = lambda xs: statistics.fmean(xs) if xs else float("nan")  # noqa: E731
    return {
        "requests": len(ok),
        "req_per_s": result.summary()["requests_per_sec"],
        "latency_ms": mean([r.latency_ms for r in ok]),
        "generation_ms": mean([r.inference_time_ms for r in ok]),
        "in_server_ms": mean([r.server_total_ms for r in ok]),
        "outside_server_ms": mean([r.latency_ms - r.server_total_ms for r in ok]),
        "tpot_ms": mean([(r.inference_time_ms - r.server_ttft_ms) / (r.tokens_generated - 1)
                         for r in ok]),
    }


def busy_python(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def redraw_timeline(stop: threading.Event, sampler) -> None:
    """What a live timeline in a notebook does every 2 s: plot the samples, render a PNG."""
    while not stop.wait(2.0):
        plots.figure_png(plots.plot_timeline(sampler.frame(), sampler.marks))


def with_thread(target, *args):
    """Run `target(stop, *args)` on a thread for the duration of a with block."""
    class Running:
        def __enter__(self):
            self.stop = threading.Event()
            self.thread = threading.Thread(target=target, args=(self.stop, *args), daemon=True)
            self.thread.start()

        def __exit__(self, *exc):
            self.stop.set()
            self.thread.join()
    return Running()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:llama-3.2-3b")
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=150)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = {}
    with launch(model=args.model) as srv:
        run = lambda c, n: loadtest.run(srv.url, concurrency=c, requests=n,  # noqa: E731
                                        max_tokens=args.max_tokens, progress=False)
        run(1, 2)  # warm-up
        rows["c=1"] = split(run(1, args.requests))
        rows["c=4"] = split(run(4, 2 * args.requests))
        url = None if gpu.nvml() else srv.url
        with utilization.UtilizationSampler(interval=0.1, url=url) as sampler, \
                with_thread(redraw_timeline, sampler):
            rows["c=1 + plot"] = split(run(1, args.requests))
        with with_thread(busy_python):
            rows["c=1 + busy"] = split(run(1, args.requests))
    card = gpu.device_info()["gpu_name"] or "CPU"
    print(f"\n{args.model} on {card}, {args.max_tokens} tokens, {time.strftime('%Y-%m-%d')}")
    print(f"{'condition':<12}{'req/s':>7}{'latency':>9}{'generation':>11}{'in server':>10}"
          f"{'outside':>9}{'TPOT':>7}   (ms, means per request)")
    for name, r in rows.items():
        print(f"{name:<12}{r['req_per_s']:>7.2f}{r['latency_ms']:>9.0f}{r['generation_ms']:>11.0f}"
              f"{r['in_server_ms']:>10.0f}{r['outside_server_ms']:>9.1f}{r['tpot_ms']:>7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "card": card, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
