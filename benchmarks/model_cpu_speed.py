"""CPU speed of the embedded model: N greedy generations of exactly 150 new tokens.

EOS is suppressed (`min_new_tokens`), so every run decodes the same number of tokens and runs
compare. Time is wall time around `generate` (time.perf_counter), after warm-up runs, for each
torch thread count asked for. The load average is printed too: on a shared 2-core machine,
other processes' load changes the figures, two threads far more than one.

    python benchmarks/model_cpu_speed.py [--model model] [--runs 10] [--threads 1,2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from labkit.engine import hf_generate, text
from labkit.engine.model import load_model
from labkit.engine.request import Request
from labkit.train.trainer import cpu_model

PROMPT = "Suggest a skincare routine for dry skin"


def time_forced(lm, tokens: int) -> float:
    ids = torch.tensor([text.tokenize(lm, Request(PROMPT, tokens))])
    started = time.perf_counter()
    with torch.inference_mode():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=tokens, min_new_tokens=tokens,
                                pad_token_id=lm.tokenizer.pad_token_id)
    elapsed = time.perf_counter() - started
    assert out.shape[1] - ids.shape[1] == tokens
    return elapsed


def measure(lm, threads: int, runs: int, warmup: int, tokens: int) -> dict:
    torch.set_num_threads(threads)
    for _ in range(warmup):
        time_forced(lm, tokens)
    times = [time_forced(lm, tokens) for _ in range(runs)]
    median = statistics.median(times)
    return {"threads": threads, "runs": runs, "median_s": round(median, 4),
            "min_s": round(min(times), 4), "max_s": round(max(times), 4),
            "ms_per_token": round(median / tokens * 1000, 3),
            "load_average_1min": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="model")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=150)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)

    default_threads = torch.get_num_threads()
    lm = load_model(args.model, device="cpu")
    rows = [measure(lm, int(t), args.runs, args.warmup, args.tokens)
            for t in args.threads.split(",")]
    torch.set_num_threads(default_threads)
    natural = hf_generate.generate(lm, PROMPT, max_tokens=args.tokens, temperature=0)
    result = {
        "cpu": cpu_model() or "unknown CPU", "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "model": lm.name, "parameters": lm.num_parameters,
        "dtype": str(lm.dtype), "prompt": PROMPT, "prompt_tokens": natural.prompt_tokens,
        "new_tokens": args.tokens, "rows": rows,
        "natural_answer": {"threads": default_threads, "tokens": natural.tokens_generated,
                           "ms": natural.inference_time_ms,
                           "finish_reason": natural.finish_reason},
    }
    print(f"Embedded model on the CPU: {result['cpu']}, {os.cpu_count()} cores, "
          f"torch {result['torch']}")
    print(f"model {lm.name}, {lm.num_parameters:,} parameters, float32; {args.runs} runs of "
          f"{args.tokens} new tokens after {args.warmup} warm-up, greedy, EOS suppressed\n")
    print("| threads | median s | min s  | max s  | ms/token | load avg |")
    print("| ------- | -------- | ------ | ------ | -------- | -------- |")
    for r in rows:
        print(f"| {r['threads']:>7} | {r['median_s']:>8.3f} | {r['min_s']:>6.3f} | "
              f"{r['max_s']:>6.3f} | {r['ms_per_token']:>8.2f} | {r['load_average_1min']:>8.2f} |")
    print(f"\nnatural answer ({default_threads} threads, stops at EOS): "
          f"{natural.tokens_generated} tokens in {natural.inference_time_ms:.0f} ms "
          f"({natural.finish_reason})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
