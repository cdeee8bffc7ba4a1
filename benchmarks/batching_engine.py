"""Output tokens per second: B requests one after another (`hf_generate.generate`) vs one
`batching.generate_batch` of the same B requests, decoded eagerly and (on a GPU) from CUDA
graphs, on this machine, in the same run, with the mean NVML utilization and SM activity of
each batched run.

Throughput = output tokens (the sum of each request's `tokens_generated`) ÷ wall time of the
whole set (time.perf_counter, after the device has finished). Sequential throughput does not
depend on B (one request at a time), so for large B it is measured on the first requests only,
within --sequential-seconds, and the table says how many ran. Each batch size is warmed up with
a short batch of its own shape first. Greedy by default; synthetic models never stop early, so
every request decodes exactly --max-tokens.

    python benchmarks/batching_engine.py [--model synthetic:llama-3.2-3b] [--device auto]
        [--batches 1 4 16 32 64] [--max-tokens 150] [--max-seconds 480] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch
import transformers

from labkit.engine import hf_generate
from labkit.engine.batched import generate_batch
from labkit.engine.model import load_model, resolve_device, synchronize
from labkit.engine.request import Request
from labkit.engine.static_decode import StaticDecoders
from labkit.measure import utilization

PROMPTS = [
    "Suggest a skincare routine",
    "Suggest a skincare routine for dry skin",
    "What does niacinamide do for oily skin?",
    "How often should I exfoliate sensitive skin, and with what?",
    "Morning routine for combination skin",
    "Is sunscreen needed on cloudy days?",
    "What order should I apply serum and moisturizer in?",
    "Evening routine for acne-prone skin with a gentle cleanser and a light moisturizer",
]


def requests_for(batch: int, max_tokens: int, temperature: float) -> list[Request]:
    return [Request(PROMPTS[i % len(PROMPTS)], max_tokens, temperature, seed=i)
            for i in range(batch)]


def run_sequential(lm, requests: list[Request], seconds: float) -> tuple[list, float]:
    """`hf_generate.generate` one request after another; stops once `seconds` have passed."""
    results = []
    started = time.perf_counter()
    for r in requests:
        results.append(hf_generate.generate(lm, r))
        if time.perf_counter() - started > seconds:
            break
    return results, time.perf_counter() - started


def run_batched(lm, requests: list[Request], static, sampler) -> dict:
    """One generate_batch, timed, with the sampler's view of its window."""
    synchronize(lm.device)
    started = time.perf_counter()
    results = generate_batch(lm, requests, static=static)  # returns after the last token
    ended = time.perf_counter()
    row = summary(results, ended - started)
    if sampler is not None:
        time.sleep(0.3)  # NVML averages over its sample period: let it cover the window's end
        util = sampler.summary(start=started, end=ended)
        row.update(mean_util=util["mean_util"], sm_activity=util.get("sm_activity_mean"))
    return row | {"results": results}


def summary(results: list, wall_s: float) -> dict:
    tokens = sum(r.tokens_generated for r in results)
    return {"requests": len(results), "output_tokens": tokens, "wall_s": round(wall_s, 3),
            "output_tokens_per_s": round(tokens / wall_s, 1),
            "mean_ttft_ms": round(sum(r.time_to_first_token_ms for r in results) / len(results), 1)}


def pct(value) -> str:
    return "-" if value is None else f"{value:.0f} %"


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads), no GPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model source (default: synthetic:llama-3.2-3b on a GPU, "
                        "the embedded model on the CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--max-tokens", type=int, default=150)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--sequential-seconds", type=float, default=30.0,
                        help="time cap of each sequential measurement (at least one request runs)")
    parser.add_argument("--max-seconds", type=float, default=480.0,
                        help="skip the remaining batch sizes once this much time has passed")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)

    began = time.perf_counter()
    device = resolve_device(args.device)
    source = args.model or ("synthetic:llama-3.2-3b" if device.type == "cuda" else "model")
    lm = load_model(source, device=device, dtype=args.dtype)
    card = card_name(device)
    print(f"{card} | torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"model {lm.name}, {lm.num_parameters:,} parameters, "
          f"{str(lm.dtype).removeprefix('torch.')}, loaded in {lm.load_time_s:.1f} s")
    print(f"{args.max_tokens} new tokens per request, temperature {args.temperature}"
          f"{' (greedy)' if args.temperature == 0 else ''}\n")
    hf_generate.warmup(lm, runs=2)
    graphs = StaticDecoders(lm) if device.type == "cuda" else None
    sampler = (utilization.UtilizationSampler(interval=0.05).start()
               if device.type == "cuda" else None)
    modes = {"eager": None} | ({"graphs": graphs} if graphs else {})

    rows, skipped = [], []
    for batch in args.batches:
        if time.perf_counter() - began > args.max_seconds:
            skipped.append(batch)
            continue
        requests = requests_for(batch, args.max_tokens, args.temperature)
        for static in modes.values():  # warm-up at this shape (captures its graph)
            generate_batch(lm, requests_for(batch, 4, args.temperature), static=static)
        seq_results, seq_s = run_sequential(lm, requests, args.sequential_seconds)
        seq = summary(seq_results, seq_s)
        row = {"batch": batch, "sequential": seq}
        for name, static in modes.items():
            measured = run_batched(lm, requests, static, sampler)
            results = measured.pop("results")
            measured["speedup"] = round(measured["output_tokens_per_s"]
                                        / seq["output_tokens_per_s"], 2)
            if args.temperature == 0:  # greedy: does batching change any text? (bf16 may)
                measured["same_text_as_sequential"] = sum(
                    a.generated_text == b.generated_text
                    for a, b in zip(seq_results, results, strict=False))
            row[name] = measured
        rows.append(row)
        print(f"batch {batch:>3}: sequential {seq['output_tokens_per_s']:>8.1f} tok/s "
              f"({seq['requests']} req), " + ", ".join(
                  f"{name} {row[name]['output_tokens_per_s']:>8.1f} tok/s "
                  f"x{row[name]['speedup']}" for name in modes), flush=True)
    if sampler is not None:
        sampler.stop()

    print(f"\n{card}, {lm.name}\n")
    print("| batch | decoding | tok/s | x sequential | utilization | SM activity | TTFT ms | "
          "wall s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        seq = row["sequential"]
        print(f"| {row['batch']} | sequential ({seq['requests']} req) | "
              f"{seq['output_tokens_per_s']:.1f} | 1.00x | | | {seq['mean_ttft_ms']:.0f} | "
              f"{seq['wall_s']:.2f} |")
        for name in modes:
            bat = row[name]
            print(f"| {row['batch']} | batched, {name} | {bat['output_tokens_per_s']:.1f} | "
                  f"{bat['speedup']:.2f}x | {pct(bat.get('mean_util'))} | "
                  f"{pct(bat.get('sm_activity'))} | {bat['mean_ttft_ms']:.0f} | "
                  f"{bat['wall_s']:.2f} |")
    if skipped:
        print(f"\nskipped batch sizes {skipped}: --max-seconds {args.max_seconds:g} reached")
    if args.temperature == 0:
        print("\ngreedy text identical to sequential: " + "; ".join(
            f"B={r['batch']}: " + ", ".join(
                f"{name} {r[name]['same_text_as_sequential']}/{r['sequential']['requests']}"
                for name in modes) for r in rows))

    if args.json:
        result = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "card": card, "device": str(device), "torch": torch.__version__,
            "transformers": transformers.__version__, "model": lm.name, "source": source,
            "parameters": lm.num_parameters, "dtype": str(lm.dtype).removeprefix("torch."),
            "max_tokens": args.max_tokens, "temperature": args.temperature,
            "sequential_seconds_cap": args.sequential_seconds, "rows": rows,
            "skipped_batches": skipped, "total_s": round(time.perf_counter() - began, 1),
        }
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
