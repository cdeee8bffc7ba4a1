"""`labkit generate "PROMPT"`: load a model, generate once, print the text and the timings."""

from __future__ import annotations

import argparse
import json

import torch

from labkit.engine import hf_generate
from labkit.engine.model import load_model
from labkit.engine.request import Request


def configure_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt")
    parser.add_argument("--model", default="model", help="model source (default: model/)")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    parser.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32")
    parser.add_argument("--max-tokens", type=int, default=150)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1, help="throwaway runs before timing")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run_cli(args) -> int:
    try:
        request = Request(args.prompt, args.max_tokens, args.temperature, args.top_p, args.seed)
        print(f"Loading model from {args.model} ...", flush=True)
        lm = load_model(args.model, device=args.device, dtype=args.dtype)
        hf_generate.warmup(lm, runs=args.warmup)
        result = hf_generate.generate(lm, request)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}")
        return 2
    if args.json:
        print(json.dumps({**result.as_dict(), "load_time_s": lm.load_time_s}, indent=2))
        return 0
    print(f"GPU: {torch.cuda.get_device_name(lm.device)}" if lm.device.type == "cuda"
          else "No GPU: generated on the CPU (CPU timings)")
    print(f"\n{result.generated_text}\n")
    report = lm.memory_report()
    print(f"model             {lm.name} ({lm.num_parameters:,} parameters, {report.dtype})")
    print(f"load time         {lm.load_time_s:.2f} s")
    print(f"tokens            {result.prompt_tokens} prompt + {result.tokens_generated} generated "
          f"({result.finish_reason})")
    print(f"TTFT              {result.time_to_first_token_ms:.1f} ms")
    print(f"total             {result.inference_time_ms:.1f} ms "
          f"({result.tokens_per_second:.1f} tokens/s, "
          f"{result.time_per_output_token_ms or 0:.2f} ms/token after the first)")
    print("\nmemory (estimate vs measured):")
    print(report.table(seq_len=result.prompt_tokens + result.tokens_generated))
    return 0
