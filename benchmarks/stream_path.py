"""The server's own cost per streamed token, with no model: `labkit serve`'s HTTP, scheduler
and streaming code in front of a stand-in engine that hands one token to every live request
each --step-ms, on a thread, as the engine process's reader thread does. A streamed load
(`labkit loadtest --api openai`) measures chunks/s and the server process's CPU time per
chunk: what the server spends between the engine and the socket, on this machine's CPUs.

    python benchmarks/stream_path.py [--concurrency 256] [--requests 768] [--max-tokens 150]
        [--step-ms 5] [--workers 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path

from labkit.engine.request import Result
from labkit.measure import loadtest
from labkit.serve.launcher import ServerProcess

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))
from stub_backend import StubBackend  # noqa: E402  (the test stub's tokenizer and text)


class StandInEngine:
    """One token for every live request each `step_s`, on a thread of its own."""

    def __init__(self, step_s: float):
        self.step_s, self.gone = step_s, None
        self.live: dict[int, list] = {}
        self.lock = threading.Lock()
        self.on_busy = self.on_idle = lambda at: None
        threading.Thread(target=self._run, daemon=True).start()

    def add(self, request, on_outcome) -> None:
        with self.lock:
            self.live[id(request)] = [request, on_outcome, 0, time.perf_counter()]

    def stats(self) -> dict:
        return {"running": len(self.live), "waiting": 0, "kv_pages_used": 0,
                "kv_pages_total": 1, "decode_steps": 0, "tokens_per_step": None}

    def stalled_s(self) -> float:
        return 0.0

    def _run(self) -> None:
        while True:
            began = time.perf_counter()
            with self.lock:
                entries = list(self.live.items())
            for key, entry in entries:
                request, on_outcome, n, started = entry
                request.emit(n)
                entry[2] = n = n + 1
                if n >= request.max_tokens or request.cancelled.is_set():
                    with self.lock:
                        del self.live[key]
                    took = (time.perf_counter() - started) * 1000
                    on_outcome(Result("", request.prompt, n, len(request.prompt_ids), 0.0,
                                      took, 0.0, None, "cpu", "stand-in", False, "length"))
            time.sleep(max(0.0, self.step_s - (time.perf_counter() - began)))


class StandInBackend(StubBackend):
    engine_process = True

    def __init__(self, step_s: float):
        super().__init__()
        self.engine = StandInEngine(step_s)
        self.context_length = self.token_budget = 100_000

    def close(self) -> None:
        pass


def serve_stand_in(step_ms: float) -> int:
    from labkit.serve.http import create_app
    from labkit.serve.lifecycle import serve

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    backend = StandInBackend(step_ms / 1000)
    app = create_app(lambda: backend, mode="continuous", max_tokens_limit=50_000)
    return asyncio.run(serve(app, "127.0.0.1", 0, watch_parent=True))


def cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--requests", type=int, default=768)
    parser.add_argument("--max-tokens", type=int, default=150)
    parser.add_argument("--step-ms", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--server-code", default=None, metavar="DIR",
                        help="run the server from another checkout of labkit (a worktree of an "
                             "earlier commit), the client from this one: before and after, "
                             "same run")
    parser.add_argument("--json", default=None)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve_stand_in(args.step_ms)
    command = [sys.executable, __file__, "--serve", "--step-ms", str(args.step_ms)]
    env = {"PYTHONPATH": args.server_code} if args.server_code else None
    server = ServerProcess("stand-in engine", command=command, env=env).start().wait_ready(60)
    try:
        run = dict(api="openai", model="stub", progress=False, ignore_eos=True,
                   workers=args.workers)
        loadtest.run(server.url, concurrency=64, requests=64, max_tokens=20, **run)  # warm
        before, began = cpu_s(server.pid), time.perf_counter()
        result = loadtest.run(server.url, concurrency=args.concurrency, requests=args.requests,
                              max_tokens=args.max_tokens, **run)
        wall, cpu = time.perf_counter() - began, cpu_s(server.pid) - before
    finally:
        server.stop()
    s = result.summary()
    chunks = s["stream_chunks"]
    row = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "server_code": args.server_code or "this checkout",
           "concurrency": args.concurrency, "step_ms": args.step_ms,
           "offered_chunks_per_sec": round(args.concurrency * 1000 / args.step_ms),
           "successful": s["successful"], "chunks_per_sec": round(chunks / s["total_time_s"]),
           "server_cpu_us_per_chunk": round(cpu / chunks * 1e6, 1),
           "server_cpu_share": round(cpu / wall, 2), "itl_ms_p50": s["itl_ms"]["p50"],
           "client_loop_lag_ms_p99": s["client_loop_lag_ms"]["p99"],
           "client_saturated": s["client_saturated"]}
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
