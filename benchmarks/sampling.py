"""The sampling step alone, on the GPU: one batch of logits (bf16, the 3B shape's vocabulary of
128,256) turned into next tokens, by argmax (greedy), by the sort-free kernel
(`labkit.engine.sample_kernel`: temperature only, and with a top-p nucleus) and by the sort the
engine used before (softmax, a full sort per row, two cumulative sums and a search), same run.

    python benchmarks/sampling.py [--rows 1 64 256 512] [--vocab 128256] [--json FILE]

Times are CUDA-event medians (triton.testing.do_bench) in microseconds. The logits are random
normal: close to the flat distributions of the synthetic shapes, the nucleus's hardest case.
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
import triton

from labkit.engine import sample_kernel


def sort_based(logits, temperature, top_p, uniform):
    """The previous method (labkit before the kernel), for the comparison."""
    probs, order = torch.softmax(logits.float() / temperature[:, None], -1).sort(-1, True)
    outside = (probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p[:, None] < 1)
    cdf = probs.masked_fill(outside, 0).cumsum(-1)
    pick = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None]).clamp(max=cdf.shape[1] - 1)
    return order.gather(-1, pick).squeeze(-1)


def time_cases(rows: int, args) -> dict[str, float]:
    """Median microseconds of each way, on one batch of `rows`."""
    logits = torch.randn(rows, args.vocab, device="cuda").to(torch.bfloat16)
    t = torch.full((rows,), args.temperature, device="cuda")
    one, p = torch.ones(rows, device="cuda"), torch.full((rows,), args.top_p, device="cuda")
    seeds = torch.randint(0, 2**31, (rows,), device="cuda", dtype=torch.int32)
    uniform = torch.rand(rows, device="cuda")
    cases = {
        "argmax": lambda: logits.argmax(-1),
        "kernel, temperature": lambda: sample_kernel.sample(logits, t, one, seeds),
        "kernel, top_p": lambda: sample_kernel.sample(logits, t, p, seeds),
        "sort, top_p": lambda: sort_based(logits, t, p, uniform),
    }
    for block, warps in args.tiles:  # the kernel's own tile sizes, to choose them
        cases[f"T {block}x{warps}w"] = (
            lambda b=block, w=warps: sample_kernel.sample(logits, t, one, seeds, b, w))
        cases[f"T,p {block}x{warps}w"] = (
            lambda b=block, w=warps: sample_kernel.sample(logits, t, p, seeds, b, w))
    return {name: round(1000 * triton.testing.do_bench(fn, warmup=50, rep=300,
                                                        return_mode="median"), 1)
            for name, fn in cases.items()}


def _tile(text: str) -> tuple[int, int]:
    block, warps = text.lower().split("x")
    return int(block), int(warps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64, 256, 512])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--tiles", type=_tile, nargs="*", default=[],
                        help="also time the kernel at these BLOCKxWARPS (e.g. 2048x8 8192x16)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    card = torch.cuda.get_device_name()
    table = []
    for rows in args.rows:
        row = {"rows": rows, **time_cases(rows, args)}
        table.append(row)
        print(row, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": card, "date": datetime.date.today().isoformat(),
                       "vocab": args.vocab, "temperature": args.temperature,
                       "top_p": args.top_p, "us": table}, f, indent=2)
    print(f"\n{card}: next tokens from bf16 logits, vocab {args.vocab}, median us")
    names = [k for k in table[0] if k != "rows"]
    width = max(len(n) for n in names) + 2
    print(f"{'rows':>6}" + "".join(f"{n:>{width}}" for n in names))
    for row in table:
        print(f"{row['rows']:>6}" + "".join(f"{row[n]:>{width}}" for n in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
