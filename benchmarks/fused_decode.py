"""Decode steps with the fused elementwise kernels (`labkit.engine.fused`) against the eager ops.

Same run, same card, same model and cache: ms per decode step replayed from the engine's CUDA
graph, for each --rows (every row has --tokens cached), with `Llama.fused_kernels` on and off;
and the GPU kernels (and copies) one eager step of one row launches with each. The two are timed
in turns, twice, and the faster of each kept. The cache holds zeros: a step's time does not
depend on what the keys are.

    python benchmarks/fused_decode.py [--model synthetic:llama-3.2-3b] [--rows 1 512]
        [--tokens 170] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch

from labkit.engine.kv_cache import PagedKVCache
from labkit.engine.llama import Llama
from labkit.engine.model import load_model
from labkit.engine.runner import Chunk, ModelRunner


def step_ms(runner: ModelRunner, chunks: list[Chunk], steps: int) -> float:
    for _ in range(10):
        runner.decode(chunks)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        runner.decode(chunks)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps * 1000


def gpu_ops_per_step(runner: ModelRunner, chunks: list[Chunk]) -> int:
    """Kernels and copies on the GPU in one eager decode step (no graph)."""
    runner.decode(chunks)  # Triton compiles, cuBLAS picks its kernels
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        runner.decode(chunks)
        torch.cuda.synchronize()
    return sum(event.count for event in profile.key_averages()
               if event.device_type == torch.autograd.DeviceType.CUDA)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:llama-3.2-3b")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 512])
    parser.add_argument("--tokens", type=int, default=170, help="cached tokens of each row")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    lm = load_model(args.model, device="cuda", dtype="bf16")
    model = Llama.from_hf(lm.model, free_source=True)
    per_row = -(-args.tokens // 16)
    cache = PagedKVCache(lm.config, max(args.rows) * per_row + 1, lm.dtype, lm.device)
    tables = [cache.free.take(per_row) for _ in range(max(args.rows))]
    row = {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
           "torch": torch.__version__, "model": args.model, "cached_tokens": args.tokens}
    with torch.inference_mode():
        one = [Chunk([1234], args.tokens - 1, tables[0])]
        for fused in (False, True):
            model.fused_kernels = fused
            eager = ModelRunner(model, cache, max_rows=1, cuda_graphs=False)
            row[f"gpu_ops_per_step_{'fused' if fused else 'eager'}"] = gpu_ops_per_step(eager, one)
        for rows in args.rows:
            chunks = [Chunk([1234], args.tokens - 1, table) for table in tables[:rows]]
            runners = {}
            for fused in (False, True):  # each runner's graph keeps the path it was captured on
                model.fused_kernels = fused
                runners[fused] = ModelRunner(model, cache, max_rows=rows)
                runners[fused].decode(chunks)
            steps, best = (300 if rows == 1 else 100), {False: float("inf"), True: float("inf")}
            for _ in range(2):  # in turns, so that a drift of the clocks touches both
                for fused in (False, True):
                    best[fused] = min(best[fused], step_ms(runners[fused], chunks, steps))
            row[f"rows_{rows}"] = {"eager_ops_ms": round(best[False], 3),
                                   "fused_ms": round(best[True], 3),
                                   "speedup": round(best[False] / best[True], 3)}
            del runners
    print(json.dumps(row, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
