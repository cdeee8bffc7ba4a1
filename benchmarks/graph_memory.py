"""GPU memory held by the continuous engine's CUDA graphs: the server's warm-up set (every decode
shape up to 256 rows × 64 pages, every short prefill shape), captured three ways in one run.

1. As the server's warm-up captured them before 2026-12-01's fix: with autograd on (the weights
   require grad, and the warm-up ran outside the engine's inference mode), logits inside every
   graph. A graph keeps its output alive, and with it everything autograd saved for a backward
   pass that never comes: every layer's activations.
2. Without autograd, logits inside every graph: (rows × vocabulary) logits per graph.
3. Without autograd, logits inside graphs of up to `runner.GRAPH_LOGITS_ROWS` rows only (the
   runner's rule now): larger graphs end at the hidden state.

    python benchmarks/graph_memory.py [--model synthetic:llama-3.2-3b] [--rows 256] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import time

import torch

from labkit.engine import runner
from labkit.engine.continuous import WARMUP_GRAPH_PAGES
from labkit.engine.kv_cache import PagedKVCache
from labkit.engine.llama import Llama
from labkit.engine.model import load_model


def warmup_shapes(model: Llama, cache: PagedKVCache, rows: int) -> list[tuple[int, int, int]]:
    """The (rows, width, pages) shapes `capture_all` captures, recorded without capturing."""
    steps = runner.ModelRunner(model, cache)
    shapes = []
    steps._graph = lambda *shape: shapes.append(shape)
    steps.capture_all(rows, WARMUP_GRAPH_PAGES)
    return shapes


def capture(model: Llama, cache: PagedKVCache, shapes: list, logits_rows: int,
            autograd: bool) -> dict:
    runner.GRAPH_LOGITS_ROWS = logits_rows
    gc.collect()
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved()
    began = time.perf_counter()
    steps = runner.ModelRunner(model, cache)
    with torch.enable_grad() if autograd else torch.no_grad():
        graphs = [runner._StepGraph(steps, *shape) for shape in shapes]
    torch.cuda.synchronize()
    row = {"autograd": autograd, "logits_in_graphs_up_to_rows": logits_rows,
           "graphs": len(graphs),
           "held_gb": round((torch.cuda.memory_reserved() - reserved) / 1e9, 3),
           "capture_s": round(time.perf_counter() - began, 2)}
    del graphs, steps
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:llama-3.2-3b")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    lm = load_model(args.model, device="cuda", dtype="bf16")
    cache = PagedKVCache.sized(lm.config, 4, lm.dtype, lm.device)
    model = Llama.from_hf(lm.model, free_source=True)
    shapes = warmup_shapes(model, cache, args.rows)
    rule = runner.GRAPH_LOGITS_ROWS
    ways = [(True, args.rows), (False, args.rows), (False, rule)]
    rows = [capture(model, cache, shapes, logits_rows, autograd)
            for autograd, logits_rows in ways]
    report = {"card": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
              "model": args.model, "vocab": lm.config.vocab_size, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(f"\n{report['card']}, {args.model}, the warm-up's {len(shapes)} graphs "
          f"(up to {args.rows} rows)")
    print(f"{'autograd':<10}{'logits inside graphs of':<26}{'held GB':>10}{'capture s':>11}")
    for row in rows:
        print(f"{'on' if row['autograd'] else 'off':<10}"
              f"{'<= ' + str(row['logits_in_graphs_up_to_rows']) + ' rows':<26}"
              f"{row['held_gb']:>10.2f}{row['capture_s']:>11.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
