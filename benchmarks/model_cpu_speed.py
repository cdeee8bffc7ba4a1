"""CPU speed of the embedded model: N greedy generations of exactly 150 new tokens.

EOS is suppressed (`min_new_tokens`), so every run decodes the same number of tokens and runs
compare. Time is wall time around `generate` (time.perf_counter), after warm-up runs.

    python benchmarks/model_cpu_speed.py [--model model] [--runs 10] [--tokens 150] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from labkit import engine
from labkit.model import load_model
from labkit.train.trainer import describe_device

PROMPT = "Suggest a skincare routine for dry skin"


def time_forced(lm, tokens: int) -> float:
    ids = engine.encode_prompt(lm, PROMPT, tokens)
    started = time.perf_counter()
    with torch.inference_mode():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=tokens, min_new_tokens=tokens,
                                pad_token_id=lm.tokenizer.pad_token_id)
    elapsed = time.perf_counter() - started
    assert out.shape[1] - ids.shape[1] == tokens
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="model")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=150)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)

    lm = load_model(args.model, device="cpu")
    for _ in range(args.warmup):
        time_forced(lm, args.tokens)
    runs = [time_forced(lm, args.tokens) for _ in range(args.runs)]
    natural = engine.generate(lm, PROMPT, max_tokens=args.tokens, temperature=0)
    median = statistics.median(runs)
    result = {
        "device": describe_device(torch.device("cpu")), "torch": torch.__version__,
        "model": lm.name, "parameters": lm.num_parameters, "dtype": str(lm.dtype),
        "prompt": PROMPT, "prompt_tokens": natural.prompt_tokens, "new_tokens": args.tokens,
        "runs": args.runs, "median_s": round(median, 4), "min_s": round(min(runs), 4),
        "max_s": round(max(runs), 4), "ms_per_token": round(median / args.tokens * 1000, 3),
        "natural_answer_tokens": natural.tokens_generated,
        "natural_answer_ms": natural.inference_time_ms,
        "natural_finish_reason": natural.finish_reason,
    }
    print(f"Embedded model on the CPU: {result['device']}, torch {result['torch']}")
    print(f"model {lm.name}, {lm.num_parameters:,} parameters, float32; "
          f"{args.runs} runs after {args.warmup} warm-up, greedy, EOS suppressed\n")
    print("| new tokens | median s | min s  | max s  | ms/token |")
    print("| ---------- | -------- | ------ | ------ | -------- |")
    print(f"| {args.tokens:>10} | {median:>8.3f} | {min(runs):>6.3f} | {max(runs):>6.3f} | "
          f"{result['ms_per_token']:>8.2f} |")
    print(f"\nnatural answer (stops at EOS): {natural.tokens_generated} tokens in "
          f"{natural.inference_time_ms:.0f} ms ({natural.finish_reason})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
