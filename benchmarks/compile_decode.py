"""Would torch.compile bring the batch-1 decode step nearer the memory-bandwidth floor?

Same run, same card: the engine's decode step at batch 1 (its CUDA graph of eager kernels)
against the same step compiled by Inductor (coordinate-descent tuning, which turns each
matrix-vector product into a fused reduction, as gpt-fast does) and then captured as a CUDA
graph the same way. Reports ms per step for both, the compile time, and how far the logits move.

    python benchmarks/compile_decode.py [--model synthetic:llama-3.2-3b] [--tokens 170]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch
from fused_decode import step_ms  # this directory's: run as python benchmarks/...

from labkit.engine.continuous import ContinuousEngine
from labkit.engine.kv_cache import PagedKVCache
from labkit.engine.llama import Llama
from labkit.engine.model import load_model
from labkit.engine.runner import Chunk


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:llama-3.2-3b")
    parser.add_argument("--tokens", type=int, default=170, help="cached tokens of the request")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    lm = load_model(args.model, device="cuda", dtype="bf16")
    cache = PagedKVCache.sized(lm.config, 2.0, lm.dtype, lm.device)
    engine = ContinuousEngine(lm, Llama.from_hf(lm.model, free_source=True), cache, max_running=1)
    runner = engine.runner
    pages = engine.block_manager.allocator.allocate(engine.block_manager.blocks_for(args.tokens))
    chunks = [Chunk([1234], args.tokens - 1, pages)]
    with torch.inference_mode():
        runner.prefill([Chunk(list(range(100, 100 + args.tokens - 1)), 0, pages)])
        eager_ms = step_ms(runner, chunks, 300, warmup=20)
        reference = runner.decode(chunks).float().clone()

        import torch._inductor.config as inductor
        inductor.coordinate_descent_tuning = True
        runner.graphs.clear()  # frees their memory pool too: the new graph needs a new one
        runner._pool = torch.cuda.graph_pool_handle()
        runner.model = torch.compile(runner.model, fullgraph=True, dynamic=False)
        began = time.perf_counter()
        compiled = runner.decode(chunks).float()  # compiles, then captures the graph
        compile_s = time.perf_counter() - began
        compiled_ms = step_ms(runner, chunks, 300, warmup=20)
    row = {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
           "torch": torch.__version__, "model": args.model, "cached_tokens": args.tokens,
           "graph_step_ms": round(eager_ms, 3), "compiled_graph_step_ms": round(compiled_ms, 3),
           "speedup": round(eager_ms / compiled_ms, 3), "compile_s": round(compile_s, 1),
           "max_abs_logit_diff": round((compiled - reference).abs().max().item(), 4),
           "same_argmax": bool((compiled.argmax(-1) == reference.argmax(-1)).all())}
    print(json.dumps(row, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
