"""The decode step's matrix-vector products one shape at a time: `labkit.engine.gemv`'s kernel
against cuBLAS (`x @ W.T`), for every tile configuration in a small grid, on this card.

For each weight shape of the model (qkv, o, gate/up, down, lm_head), the one-row product
runs over every layer's own matrix in turn (so no matrix is read from the 50 MB L2 cache of the
step before), inside a CUDA graph, as in a decode step; the time per product is the graph's
replay time over the number of products. GB/s counts the weight bytes read. The best tile of
each shape is what `gemv.CONFIGS` holds.

With --quantization fp8 the weights are FP8 (`labkit.engine.quant`): the kernel reads one byte
per weight and its tiles go to `gemv.FP8_CONFIGS`; the baseline is then the dequantize + cuBLAS
product that steps of more tokens may fall back to.

    python benchmarks/decode_gemv.py [--model synthetic:llama-3.2-3b] [--json FILE]
        [--quantization fp8]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import time

import torch

from labkit.engine import fused, gemv, quant
from labkit.engine.llama import Llama
from labkit.engine.model import load_model
from labkit.measure import roofline

TILES = list(itertools.product((2, 4, 8), (1024, 2048), (4, 8), (1, 2)))  # N, K, warps, stages
# FP8: a load of BLOCK_K bytes moves half a bf16 tile's, so wider and longer tiles too (an
# fp32 product tile of 4k to 32k elements: beyond that the registers spill).
FP8_TILES = [tile for tile in itertools.product((4, 8, 16, 32), (512, 1024, 2048, 4096),
                                                 (4, 8), (1, 2))
             if 4096 <= tile[0] * tile[1] <= 32768]


def graph_ms(fn, replays: int = 20) -> float:
    """ms per replay of fn captured as a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / replays * 1000


def shapes(model: Llama) -> dict[str, list[torch.Tensor]]:
    """Each product's weight in every layer (the lm_head's four times over)."""
    return {"qkv": [layer.qkv for layer in model.layers],
            "o": [layer.o for layer in model.layers],
            "gate_up": [layer.gate_up for layer in model.layers],
            "down": [layer.down for layer in model.layers],
            "lm_head": [model.lm_head] * 4}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:llama-3.2-3b")
    parser.add_argument("--quantization", choices=["bf16", "fp8"], default="bf16")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    lm = load_model(args.model, device="cuda", dtype="bf16")
    model = Llama.from_hf(lm.model, free_source=True,
                          quantization=None if args.quantization == "bf16" else "fp8")
    configs = gemv.FP8_CONFIGS if model.quantization else gemv.CONFIGS
    bandwidth = roofline.measure_copy_bandwidth("cuda")
    report = {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "model": args.model, "pdl": fused.pdl(lm.device),
              "quantization": args.quantization,
              "copy_bandwidth_tb_s": round(bandwidth / 1e12, 3), "shapes": []}
    with torch.inference_mode():
        for name, weights in shapes(model).items():
            n, k = weights[0].shape
            x = torch.randn(1, k, device="cuda", dtype=lm.dtype)
            gigabytes = quant.nbytes(weights[0]) / 1e9
            cublas = graph_ms(lambda x=x, weights=weights: [quant.dequant_matmul(x, w)
                                                            if model.quantization else x @ w.T
                                                            for w in weights]) / len(weights)
            parts = [quant.parts(w) for w in weights]
            tiles = {}
            for tile in FP8_TILES if model.quantization else TILES:
                configs[(n, k)] = tile
                tiles[tile] = graph_ms(
                    lambda x=x, parts=parts: [gemv.linear(x, w, s) for w, s in parts]
                ) / len(weights)
            best = min(tiles, key=tiles.get)
            del configs[(n, k)]
            # what the engine runs without this benchmark's table
            default = gemv.tile(n, k, parts[0][0].element_size())
            configs[(n, k)] = best
            row = {"name": name, "n": n, "k": k,
                   "floor_us": round(gigabytes * 1e9 / bandwidth * 1e6, 2),
                   "cublas_us": round(cublas * 1000, 2),
                   "gemv_us": round(tiles[best] * 1000, 2), "best_tile": best,
                   "default_tile": default,
                   "default_tile_us": round(tiles[default] * 1000, 2) if default in tiles
                   else None,
                   "cublas_tb_s": round(gigabytes / cublas, 2),
                   "gemv_tb_s": round(gigabytes / tiles[best], 2),
                   "tiles_us": {str(t): round(v * 1000, 2) for t, v in
                                sorted(tiles.items(), key=lambda kv: kv[1])[:6]}}
            report["shapes"].append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{report['card']}, copy {report['copy_bandwidth_tb_s']} TB/s, PDL {report['pdl']}")
    print(f"{'product':<9}{'floor µs':>10}{'cuBLAS µs':>11}{'gemv µs':>9}"
          f"{'gemv TB/s':>10}  tile (N, K, warps, stages)")
    for row in report["shapes"]:
        print(f"{row['name']:<9}{row['floor_us']:>10}{row['cublas_us']:>11}"
              f"{row['gemv_us']:>9}{row['gemv_tb_s']:>10}  {row['best_tile']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
