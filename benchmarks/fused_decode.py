"""Decode steps down each path of the engine's layers, same run, same card, same model and cache.

ms per decode step replayed from the engine's CUDA graph, for each --rows (every row has --tokens
cached), down each path (`labkit.engine.llama`):

    eager_ops            EagerOps: a PyTorch kernel per elementwise operation, cuBLAS products
    fused                FusedOps: a Triton kernel per stretch between two products (`fused`)
    fused_gemv           GemvOps, one-row steps only: the products as `gemv` kernels with the
                         elementwise step inside, overlapping by programmatic dependent launch
    fused_gemv_no_pdl    the same without programmatic dependent launch

and the GPU kernels (and copies) one eager step of one row launches on each. The paths are timed
in turns, twice, and the faster of each kept. The cache holds zeros: a step's time does not
depend on what the keys are. --tiles takes benchmarks/decode_gemv.py's JSON: its best tile for
each product instead of `gemv.tile`'s rule.

    python benchmarks/fused_decode.py [--model synthetic:llama-3.2-3b] [--rows 1 512]
        [--tokens 170] [--tiles FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch

from labkit.engine import fused, gemv
from labkit.engine.block_manager import BlockAllocator
from labkit.engine.kv_cache import PagedKVCache
from labkit.engine.llama import Llama
from labkit.engine.model import load_model
from labkit.engine.runner import Chunk, ModelRunner

# path: (fused elementwise kernels, gemv products for a few rows, programmatic dependent launch)
PATHS = {"eager_ops": (False, False, False), "fused": (True, False, True),
         "fused_gemv": (True, True, True), "fused_gemv_no_pdl": (True, True, False)}


def use(model: Llama, fused_kernels: bool, gemv_kernels: bool, pdl: bool) -> None:
    model.fused_kernels, model.gemv_kernels, fused.PDL = fused_kernels, gemv_kernels, pdl


def step_ms(runner: ModelRunner, chunks: list[Chunk], steps: int, warmup: int = 10) -> float:
    """ms per decode step of `chunks` (from the runner's CUDA graph when it has one), over
    `steps` steps after `warmup` untimed ones. benchmarks/compile_decode.py times with it too."""
    for _ in range(warmup):
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
    parser.add_argument("--tiles", help="gemv tiles by shape: a JSON of benchmarks/decode_gemv.py")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.tiles:
        with open(args.tiles) as f:
            for shape in json.load(f)["shapes"]:
                gemv.CONFIGS[(shape["n"], shape["k"])] = tuple(shape["best_tile"])

    lm = load_model(args.model, device="cuda", dtype="bf16")
    model = Llama.from_hf(lm.model, free_source=True)
    per_row = -(-args.tokens // 16)
    cache = PagedKVCache(lm.config, max(args.rows) * per_row + 1, lm.dtype, lm.device)
    allocator = BlockAllocator(cache.num_pages)
    tables = [allocator.allocate(per_row) for _ in range(max(args.rows))]
    row = {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
           "torch": torch.__version__, "model": args.model, "cached_tokens": args.tokens,
           "gemv_tiles": {f"{n}x{k}": tile for (n, k), tile in gemv.CONFIGS.items()}}
    with torch.inference_mode():
        one = [Chunk([1234], args.tokens - 1, tables[0])]
        for name, (fused_on, gemv_on, pdl_on) in PATHS.items():
            use(model, fused_on, gemv_on, pdl_on)
            eager = ModelRunner(model, cache, cuda_graphs=False)
            row[f"gpu_ops_per_step_{name}"] = gpu_ops_per_step(eager, one)
        for rows in args.rows:
            chunks = [Chunk([1234], args.tokens - 1, table) for table in tables[:rows]]
            paths = {name: flags for name, flags in PATHS.items()
                     if not flags[1] or rows == 1}
            runners = {}
            for name, flags in paths.items():  # a runner's graph keeps the path it was captured on
                use(model, *flags)
                runners[name] = ModelRunner(model, cache)
                runners[name].decode(chunks)
            steps, best = (300 if rows == 1 else 100), dict.fromkeys(paths, float("inf"))
            for _ in range(2):  # in turns, so that a drift of the clocks touches both
                for name in paths:
                    best[name] = min(best[name], step_ms(runners[name], chunks, steps))
            row[f"rows_{rows}"] = {f"{name}_ms": round(ms, 3) for name, ms in best.items()}
            del runners
        use(model, True, True, True)
    print(json.dumps(row, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
