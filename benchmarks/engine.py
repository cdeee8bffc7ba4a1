"""The continuous-batching engine against the memory-bandwidth floor and against transformers'
own continuous batching (`model.generate_batch`, a paged cache too), on this machine, same run.

1. Batch 1, for each --shapes model: ms per output token (the engine's TPOT: decode steps only,
   prefill excluded) against the floor, weight bytes ÷ the device-to-device copy bandwidth
   measured at the start of the run; HF generate_batch on the same single request beside it.
2. Throughput, for --model: output tokens per second of N concurrent requests (all submitted at
   once; --prompt-tokens + --max-tokens each, greedy, no early stop), wall time from the first
   prefill to the last token, for each N in --concurrency; HF generate_batch on the same requests.
   NVML utilization and SM activity over our run when NVML has them.
3. --profile: torch.profiler over a few eager decode steps at batch 1 and at the largest N
   (and at batch 1 over steps replayed from their graph: each kernel's marginal time by role):
   GPU time by kernel family, and the step's wall time with and without CUDA graphs.

--quantization bf16 fp8 runs 1 and 2 for each, in the same run (`labkit.engine.quant`): FP8
weights at batch 1 against their own floor, the bytes a step reads (FP8 products and lm_head,
bf16 norms) over the same copy bandwidth; at N concurrent, each --fp8-matmul recipe for the
products of many tokens (`torch._scaled_mm` with per-token activation scales, or dequantize to
bf16 then a bf16 matmul), so the run shows which is faster. A batch-1 floor counts the bytes a
step reads: for an untied lm_head (8B) the embedding table is not one of them (a step reads one
row of it); `weight_floor_ms` keeps the older all-weights floor. --kv-cache-dtype auto fp8 runs
each of those at N concurrent with the model's-dtype KV cache and with an FP8 one
(`labkit.engine.kv_cache`): half the bytes each step's attention reads.

4. --shared-prefix TOKENS (default 1000; 0 skips it): --shared-requests requests (512) of a
   common TOKENS-token prefix and --shared-own-tokens (20) of their own, --max-tokens out, all
   submitted at once, on --model with the prefix cache off, then on (`labkit.engine.
   block_manager`), same run: TTFT from submission (p50) and output tok/s of each, the
   prefix-cache hits. Each is run once untimed first (every CUDA graph shape it takes), and
   timed from an empty cache. The other sections run with the prefix cache off.

Synthetic shapes never stop early, so every request decodes exactly --max-tokens. HF's tok/s is
over its generation span, from its own per-request timestamps (its setup and warm-up left out;
the whole call's rate is recorded too); its batch-1 ms/token is its mean time between tokens.

    python benchmarks/engine.py [--shapes llama-3.2-1b llama-3.2-3b llama-3.1-8b]
        [--model synthetic:llama-3.2-3b] [--concurrency 64 256 512] [--json FILE] [--profile]
        [--quantization bf16 fp8] [--fp8-matmul scaled_mm dequant] [--kv-cache-dtype auto fp8]
        [--no-sampled]
        [--shared-prefix 1000] [--shared-requests 512] [--shared-own-tokens 20]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import random
import time

import torch
import transformers

from labkit.engine import memory, quant
from labkit.engine.continuous import ContinuousEngine
from labkit.engine.kv_cache import KV_CACHE_DTYPES, PagedKVCache, resolve_kv_dtype
from labkit.engine.llama import Llama
from labkit.engine.model import load_model, synchronize
from labkit.engine.request import Request
from labkit.engine.runner import Chunk, padded
from labkit.measure import roofline, utilization

QUANTIZATIONS = ["bf16", "fp8"]  # bf16: the weights as loaded (--dtype)


def fixed_requests(n: int, prompt_tokens: int, max_tokens: int, vocab: int,
                   temperature: float = 0.0, top_p: float | None = None) -> list[Request]:
    """n requests of exactly `prompt_tokens` random ids (seeded) and `max_tokens` (greedy
    unless given a temperature; each seeded)."""
    rng = random.Random(0)
    requests = []
    for i in range(n):
        request = Request("benchmark", max_tokens, temperature, top_p=top_p, seed=i,
                          ignore_eos=True)
        request.prompt_ids = [rng.randrange(100, vocab) for _ in range(prompt_tokens)]
        requests.append(request)
    return requests


def build_engine(lm, max_running: int, kv_gb: float, cuda_graphs: bool = True,
                 quantization: str = "bf16", matmul: str | None = None,
                 prefix_cache: bool = False, kv_cache_dtype: str = "auto"):
    cache = PagedKVCache.sized(lm.config, kv_gb, resolve_kv_dtype(kv_cache_dtype, lm.dtype),
                               lm.device)
    # HF's weights kept: its generate_batch runs too, and each quantization starts from them
    model = Llama.from_hf(lm.model, quantization=None if quantization == "bf16" else quantization)
    if matmul is not None:
        quant.set_matmul(model, matmul)
    return ContinuousEngine(lm, model, cache, max_running=max_running, cuda_graphs=cuda_graphs,
                            prefix_cache=prefix_cache)


def run_engine(engine: ContinuousEngine, requests: list[Request], sampler=None) -> dict:
    synchronize(engine.lm.device)
    before = engine.stats()
    started = time.perf_counter()
    results = engine.generate(requests)
    ended = time.perf_counter()
    after = engine.stats()
    tokens = sum(r.tokens_generated for r in results)
    steps = after["decode_steps"] - before["decode_steps"]
    row = {"requests": len(requests), "output_tokens": tokens, "wall_s": round(ended - started, 3),
           "tok_s": round(tokens / (ended - started), 1),
           "tpot_ms_mean": round(sum(r.time_per_output_token_ms for r in results)
                                 / len(results), 3),
           "ttft_ms_p50": sorted(r.time_to_first_token_ms for r in results)[len(results) // 2],
           # the engine's thread: the wall time over its decode steps, and the share of it
           # spent waiting for the GPU (near 0: the host's step work is the bottleneck)
           "wall_ms_per_decode_step": round((ended - started) * 1000 / max(1, steps), 3),
           "device_wait_share": round((after["device_wait_s"] - before["device_wait_s"])
                                      / (ended - started), 3),
           # CUDA graphs captured inside the run (a step that captures stalls every row)
           "graph_capture_s": round(after["graph_capture_s"] - before["graph_capture_s"], 3)}
    if sampler is not None:
        util = sampler.summary(start=started, end=ended)
        row.update(nvml_util=util.get("mean_util"), sm_activity=util.get("sm_activity_mean"))
    return row


def run_hf(lm, requests: list[Request], warmup: bool) -> dict:
    """transformers' continuous batching on the same prompts. Its tok/s is over its generation
    span (first request scheduled -> last one finished, its own clock), which leaves out the
    setup and CUDA-graph warm-up of each `generate_batch` call; the whole call is kept too."""
    config = transformers.GenerationConfig(max_new_tokens=requests[0].max_tokens, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)
    synchronize(lm.device)
    started = time.perf_counter()
    outputs = list(lm.model.generate_batch([r.prompt_ids for r in requests],
                                           generation_config=config, warmup=warmup,
                                           record_timestamps=True).values())
    call = time.perf_counter() - started
    tokens = sum(len(out.generated_tokens) for out in outputs)
    span = max(out.lifespan[1] for out in outputs) - min(out.lifespan[0] for out in outputs)
    tpots = [(out.timestamps[-1] - out.timestamps[0]) * 1000 / (len(out.timestamps) - 1)
             for out in outputs if out.timestamps and len(out.timestamps) > 1]
    return {"output_tokens": tokens, "call_s": round(call, 3), "span_s": round(span, 3),
            "tok_s": round(tokens / span, 1), "tok_s_whole_call": round(tokens / call, 1),
            "tpot_ms_mean": round(sum(tpots) / len(tpots), 3) if tpots else None}


def batch1(source: str, args, bandwidth: float) -> list[dict]:
    """One row per --quantization: ms per token at batch 1 against that dtype's floor."""
    lm = load_model(source, device=args.device, dtype=args.dtype)
    weights = memory.weight_bytes(lm.model)
    vocab = lm.config.vocab_size
    rows = []
    for quantization in args.quantization:
        engine = build_engine(lm, 1, kv_gb=2.0, quantization=quantization)
        engine.generate(fixed_requests(1, args.prompt_tokens, 8, vocab))  # captures the graph
        ours = [run_engine(engine, fixed_requests(1, args.prompt_tokens, args.max_tokens, vocab))
                for _ in range(3)]
        best = min(ours, key=lambda row: row["tpot_ms_mean"])
        read = quant.step_read_bytes(engine.runner.model)
        floor = roofline.decode_floor_ms(read, bandwidth)
        rows.append({"model": source, "quantization": quantization,
                     "weight_gb": round(weights / 1e9, 3), "read_gb": round(read / 1e9, 3),
                     "floor_ms": round(floor, 3),
                     "weight_floor_ms": round(roofline.decode_floor_ms(weights, bandwidth), 3),
                     "ms_per_token": best["tpot_ms_mean"],
                     "ms_per_token_runs": [r["tpot_ms_mean"] for r in ours],
                     "x_floor": round(best["tpot_ms_mean"] / floor, 3)})
        del engine
        release()
    _speedups(rows, "ms_per_token", lower_is_better=True)
    if not args.no_hf:
        hf = run_hf(lm, fixed_requests(1, args.prompt_tokens, args.max_tokens, vocab),
                    args.hf_warmup)
        rows[0]["hf_generate_batch_ms_per_token"] = hf["tpot_ms_mean"]
    del lm
    release()
    return rows


def release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _speedups(rows: list[dict], key: str, lower_is_better: bool) -> None:
    """Each quantized row's speed-up over the bf16 row (weights and KV cache) of the same run
    (`x_bf16`)."""
    def plain(row: dict) -> bool:
        return row["quantization"] == "bf16" and row.get("kv_cache_dtype", "auto") == "auto"

    base = next((row[key] for row in rows if plain(row)), None)
    for row in rows:
        if base and not plain(row):
            ratio = base / row[key] if lower_is_better else row[key] / base
            row["x_bf16"] = round(ratio, 3)


def throughput_variants(args) -> list[tuple[str, str | None, str]]:
    """(quantization, FP8 matmul, KV cache dtype) to run at each concurrency: bf16, then each
    FP8 recipe, for each --kv-cache-dtype."""
    weights = [("bf16", None)] if "bf16" in args.quantization else []
    if "fp8" in args.quantization:
        weights += [("fp8", matmul) for matmul in args.fp8_matmul]
    return [(q, matmul, kv) for kv in args.kv_cache_dtype for q, matmul in weights]


def throughput(args, sampler) -> list[dict]:
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    top = max(args.concurrency)
    vocab = lm.config.vocab_size
    rows, profiles = [], []
    for quantization, matmul, kv_dtype in throughput_variants(args):
        engine = build_engine(lm, top, kv_gb=args.kv_cache_gb, quantization=quantization,
                              matmul=matmul, kv_cache_dtype=kv_dtype)
        for n in args.concurrency:
            rows.append({"quantization": quantization, "matmul": matmul,
                         "kv_cache_dtype": kv_dtype,
                         **throughput_row(lm, engine, n, vocab, args, sampler)})
            print(rows[-1], flush=True)
        if args.profile:
            profiles.append({"quantization": quantization, "matmul": matmul,
                             "kv_cache_dtype": kv_dtype,
                             "profile": profile_decode(lm, engine, sorted({1, top}), args)})
        del engine
        release()
    for n in args.concurrency:
        _speedups([row for row in rows if row["concurrency"] == n], "tok_s",
                  lower_is_better=False)
    return rows + profiles


def throughput_row(lm, engine: ContinuousEngine, n: int, vocab: int, args, sampler) -> dict:
    """N concurrent requests, greedy (and, with --sampled, at --temperature, then with
    --top-p too); HF's generate_batch on the same requests for bf16."""
    # Warm-up, untimed: this size's CUDA graphs, and greedy and sampled steps (the sampling
    # kernel's first call at a size compiles it, which must not fall inside the first sampled
    # run's time).
    sampled_warmups = ((args.temperature, None), (args.temperature, args.top_p))
    for temperature, top_p in ((0.0, None), *(sampled_warmups if args.sampled else ())):
        engine.generate(fixed_requests(n, args.prompt_tokens, 4, vocab, temperature, top_p))
    # and the decode graphs of the page counts the rows grow into, as a server's warm-up
    # captures them: a capture inside the timed run would stall all n rows for it
    pages = engine.block_manager.blocks_for(args.prompt_tokens + args.max_tokens)
    engine.runner.capture_all(n, padded(pages))
    row = {"concurrency": n, **run_engine(
        engine, fixed_requests(n, args.prompt_tokens, args.max_tokens, vocab), sampler)}
    # The same requests sampled: at --temperature (top_p 1), then with --top-p as well.
    for name, top_p in (("sampled", None), ("nucleus", args.top_p)) if args.sampled else ():
        sampled = run_engine(engine, fixed_requests(n, args.prompt_tokens, args.max_tokens,
                                                    vocab, args.temperature, top_p))
        row[name] = {"temperature": args.temperature, "top_p": top_p or 1.0, **sampled,
                     "x_greedy_step": round(sampled["tpot_ms_mean"] / row["tpot_ms_mean"], 3)}
    if not args.no_hf and engine.runner.model.quantization is None \
            and engine.cache.dtype == lm.dtype:
        hf = run_hf(lm, fixed_requests(n, args.prompt_tokens, args.max_tokens, vocab),
                    args.hf_warmup)
        row["hf_tok_s"], row["hf_tok_s_whole_call"] = hf["tok_s"], hf["tok_s_whole_call"]
        row["x_hf"] = round(row["tok_s"] / hf["tok_s"], 2)
    return row


def shared_prefix_requests(args, vocab: int) -> list[Request]:
    """--shared-requests requests: one --shared-prefix prefix (seeded ids), then their own."""
    rng = random.Random(1)
    prefix = [rng.randrange(100, vocab) for _ in range(args.shared_prefix)]
    requests = fixed_requests(args.shared_requests, args.shared_own_tokens, args.max_tokens,
                              vocab)
    for request in requests:
        request.prompt_ids = prefix + request.prompt_ids
    return requests


def shared_prefix(args) -> list[dict]:
    """The shared-prefix workload with the prefix cache off, then on; the on row's speed-ups."""
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    rows, outputs = [], []
    for cache in (False, True):
        engine = build_engine(lm, args.shared_requests, kv_gb=args.kv_cache_gb,
                              prefix_cache=cache)
        engine.generate(shared_prefix_requests(args, lm.config.vocab_size))  # untimed
        engine.block_manager.reset_prefix_cache()  # timed from an empty cache
        row, results = shared_prefix_run(engine, shared_prefix_requests(args,
                                                                        lm.config.vocab_size))
        rows.append({"prefix_cache": cache, **row})
        outputs.append([r.token_ids for r in results])
        print(rows[-1], flush=True)
        del engine
        release()
    off, on = rows
    on["x_ttft_p50"] = round(off["ttft_ms_p50"] / on["ttft_ms_p50"], 2)
    on["x_tok_s"] = round(on["tok_s"] / off["tok_s"], 3)
    on["same_greedy_output"] = sum(a == b for a, b in zip(*outputs, strict=True)) / len(
        outputs[0])
    del lm
    release()
    return rows


def shared_prefix_run(engine: ContinuousEngine, requests: list[Request]) -> tuple[dict, list]:
    """One timed run: output tok/s over the wall time, TTFT from submission (the queue
    included: all are submitted at once), the prefix cache's hits in prompt tokens."""
    synchronize(engine.lm.device)
    before = engine.stats()  # counters since the engine was built: this run's are the change
    started = time.perf_counter()
    results = engine.generate(requests)
    wall = time.perf_counter() - started
    ttft = sorted((r.queue_time_ms or 0.0) + r.time_to_first_token_ms for r in results)
    after = engine.stats()
    stats = {key: after[key] - before[key] for key in (
        "prefill_tokens", "preemptions", "prefix_cache_queries", "prefix_cache_hits")}
    tokens = sum(r.tokens_generated for r in results)
    return {"requests": len(requests), "prompt_tokens": len(requests[0].prompt_ids),
            "output_tokens": tokens, "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 1),
            "ttft_ms_p50": round(ttft[len(ttft) // 2], 1),
            "ttft_ms_p90": round(ttft[int(len(ttft) * 0.9)], 1),
            "prefill_tokens": stats["prefill_tokens"], "preemptions": stats["preemptions"],
            "prefix_cache_queries": stats["prefix_cache_queries"],
            "prefix_cache_hits": stats["prefix_cache_hits"]}, results


def profile_decode(lm, engine: ContinuousEngine, sizes: list[int], args) -> list[dict]:
    """Decode steps of `rows` requests at ~100 cached tokens: wall ms per step from the CUDA
    graph and eagerly, and the eager step's GPU time by kernel family and its top kernels
    (torch.profiler)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    out = []
    allocator = engine.block_manager.allocator
    for rows in sizes:
        per_row = engine.block_manager.blocks_for(args.prompt_tokens + 100)
        pages = [allocator.allocate(per_row) for _ in range(rows)]
        chunks = [Chunk([1], args.prompt_tokens + 99, p) for p in pages]
        timings = {}
        for graphs in (True, False):
            engine.runner.cuda_graphs = graphs
            with torch.inference_mode():
                for _ in range(3):
                    engine.runner.decode(chunks)
                synchronize(lm.device)
                started = time.perf_counter()
                for _ in range(10):
                    engine.runner.decode(chunks)
                synchronize(lm.device)
            timings["graph_ms" if graphs else "eager_ms"] = round(
                (time.perf_counter() - started) * 100, 3)
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                engine.runner.decode(chunks)
            synchronize(lm.device)
        engine.runner.cuda_graphs = True
        if rows == 1:  # the step as served: replayed from its graph, kernels overlapping
            with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as replays:
                for _ in range(3):
                    engine.runner.decode(chunks)
                synchronize(lm.device)
            timings["graph_timeline"] = step_timeline(
                [(event.name, event.time_range.start, event.time_range.end)
                 for event in replays.events() if event.device_type == DeviceType.CUDA],
                lm.config.num_hidden_layers, steps=3)
        families: dict[str, float] = {}
        kernels = sorted(((event.device_time_total / 3 / 1000, event.count // 3, event.key)
                          for event in prof.key_averages() if event.device_time_total > 0),
                         reverse=True)
        for ms, _, name in kernels:
            families[kernel_family(name)] = families.get(kernel_family(name), 0) + ms
        out.append({"rows": rows, **timings,
                    "gpu_ms_by_family": {k: round(v, 3) for k, v in
                                         sorted(families.items(), key=lambda kv: -kv[1])},
                    # the kernels that take most of a step: ms a step, launches a step, name
                    "top_kernels": [[round(ms, 4), count, name[:90]]
                                    for ms, count, name in kernels[:14]]})
        for p in pages:
            allocator.free(p)
        print(out[-1], flush=True)
    return out


LAYER_PRODUCTS = ("qkv", "o", "gate_up", "down")  # a layer's GEMV kernels, in order


def step_timeline(kernels: list[tuple[str, float, float]], layers: int, steps: int) -> dict:
    """Where a one-token step's time goes, from the (name, start, end) µs of the kernels of
    `steps` identical steps: each kernel's marginal time (its end after the latest end before
    it: under PDL a kernel starts early and waits for the one before, so its own duration
    overstates what it adds), summed per role, µs a step. The GEMV kernels are named by their
    place in a layer (`LAYER_PRODUCTS`), the one after the last layer lm_head."""
    kernels = sorted(kernels, key=lambda kernel: kernel[1])
    per_step = len(kernels) // steps
    roles: dict[str, list[float]] = {}
    for step in range(steps):
        products, latest_end = 0, None
        for name, start, end in kernels[step * per_step:(step + 1) * per_step]:
            role = name[:60]
            if "gemv" in name:
                role = LAYER_PRODUCTS[products % 4] if products < 4 * layers else "lm_head"
                products += 1
            marginal = end - start if latest_end is None else max(end - latest_end, 0.0)
            latest_end = end if latest_end is None else max(latest_end, end)
            totals = roles.setdefault(role, [0.0, 0.0, 0])
            totals[0] += marginal
            totals[1] += end - start
            totals[2] += 1
    return {role: {"marginal_us": round(marginal / steps, 1),
                   "duration_us": round(duration / steps, 1), "launches": launches // steps}
            for role, (marginal, duration, launches) in
            sorted(roles.items(), key=lambda item: -item[1][0])}


def kernel_family(name: str) -> str:
    lowered = name.lower()
    for family, marks in [("matmul (gemm/gemv)", ("gemm", "gemv", "cublas", "cutlass", "sm90")),
                          ("attention", ("attention", "fmha", "flash", "softmax")),
                          ("kv gather/scatter", ("index", "gather", "scatter")),
                          ("copies", ("copy", "memcpy", "memset", "cat"))]:
        if any(mark in lowered for mark in marks):
            return family
    return "elementwise/other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=["llama-3.2-1b", "llama-3.2-3b",
                                                        "llama-3.1-8b"])
    parser.add_argument("--model", default="synthetic:llama-3.2-3b")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[64, 256, 512])
    parser.add_argument("--prompt-tokens", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=150)
    parser.add_argument("--kv-cache-gb", type=float, default=24.0)
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="the sampled runs' temperature (the seed's default, 0.7); every "
                             "throughput row is also run greedy, in the same run")
    parser.add_argument("--top-p", type=float, default=0.9,
                        help="the nucleus runs' top_p (default 0.9)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' generate_batch")
    parser.add_argument("--hf-warmup", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--quantization", nargs="+", choices=QUANTIZATIONS, default=["bf16"],
                        help="weights to run each shape and concurrency with, in the same run: "
                             "bf16 (--dtype as loaded) and/or fp8 (labkit.engine.quant)")
    parser.add_argument("--fp8-matmul", nargs="+", choices=quant.MATMULS,
                        default=list(quant.MATMULS),
                        help="FP8 products of many tokens to time at each concurrency "
                             "(default both: torch._scaled_mm, and dequantize + bf16 matmul)")
    parser.add_argument("--kv-cache-dtype", nargs="+", choices=KV_CACHE_DTYPES,
                        default=["auto"],
                        help="KV caches to run each concurrency with, in the same run: auto "
                             "(the model's dtype) and/or fp8")
    parser.add_argument("--sampled", action=argparse.BooleanOptionalAction, default=True,
                        help="also run each concurrency sampled (--temperature, then --top-p)")
    parser.add_argument("--shared-prefix", type=int, default=1000, metavar="TOKENS",
                        help="the shared-prefix workload's common prefix (default 1000; 0 "
                             "skips it), run with the prefix cache off and on")
    parser.add_argument("--shared-requests", type=int, default=512)
    parser.add_argument("--shared-own-tokens", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.quantization = sorted(set(args.quantization), key=QUANTIZATIONS.index)  # bf16 first

    device = torch.device(args.device)
    if "fp8" in args.quantization:  # before any run: a card without FP8 tensor cores
        quant.check_supported(device)
    if "fp8" in args.kv_cache_dtype:
        quant.check_supported(device, "--kv-cache-dtype fp8", "--kv-cache-dtype auto")
    bandwidth = roofline.measure_copy_bandwidth(device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{card}: device copy {bandwidth / 1e12:.2f} TB/s", flush=True)
    report = {"card": card, "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "copy_bandwidth_tb_s": round(bandwidth / 1e12, 3), "batch1": [], "throughput": []}
    for shape in args.shapes:
        for row in batch1(f"synthetic:{shape}", args, bandwidth):
            report["batch1"].append(row)
            print(row, flush=True)
    if args.concurrency:
        sampler = (utilization.UtilizationSampler(interval=0.05).start()
                   if device.type == "cuda" else None)
        report["throughput"] = throughput(args, sampler)
        if sampler is not None:
            sampler.stop()
    if args.shared_prefix:
        report["shared_prefix"] = shared_prefix(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)

    print_tables(report, args)
    return 0


def print_tables(report: dict, args) -> None:
    print(f"\n{report['card']}, device copy {report['copy_bandwidth_tb_s']} TB/s, "
          f"{args.dtype}, {args.prompt_tokens} prompt + {args.max_tokens} output tokens; floor: "
          "the bytes a step reads over the copy bandwidth")
    print(f"{'model':<28}{'weights':>8}{'floor ms':>10}{'ms/token':>10}{'x floor':>9}"
          f"{'x bf16':>8}{'HF ms/tok':>11}")
    for row in report["batch1"]:
        print(f"{row['model']:<28}{row['quantization']:>8}{row['floor_ms']:>10}"
              f"{row['ms_per_token']:>10}{row['x_floor']:>9}{str(row.get('x_bf16', '-')):>8}"
              f"{str(row.get('hf_generate_batch_ms_per_token', '-')):>11}")
    print(f"{'weights':<20}{'concurrency':>11}{'tok/s':>10}{'x bf16':>8}{'HF tok/s':>10}"
          f"{'x HF':>7}{'util':>7}{'SM':>7}{'T tok/s':>9}{'x step':>7}{'T,p tok/s':>10}"
          f"{'x step':>7}")
    for row in report["throughput"]:
        if "concurrency" not in row:
            continue
        weights = "/".join(filter(None, (row["quantization"], row["matmul"]))) + (
            "+kv8" if row.get("kv_cache_dtype") == "fp8" else "")
        t, tp = row.get("sampled", {}), row.get("nucleus", {})
        print(f"{weights:<20}{row['concurrency']:>11}{row['tok_s']:>10}"
              f"{str(row.get('x_bf16', '-')):>8}{str(row.get('hf_tok_s', '-')):>10}"
              f"{str(row.get('x_hf', '-')):>7}{_pct(row.get('nvml_util')):>7}"
              f"{_pct(row.get('sm_activity')):>7}{t.get('tok_s', '-'):>9}"
              f"{t.get('x_greedy_step', '-'):>7}{tp.get('tok_s', '-'):>10}"
              f"{tp.get('x_greedy_step', '-'):>7}")
    print(f"T = temperature {args.temperature}, p = top_p {args.top_p}; +kv8: an FP8 KV cache; "
          "x step: the sampled decode step's time over the greedy one's (TPOT)")
    print_shared_prefix(report.get("shared_prefix", []), args)


def print_shared_prefix(rows: list[dict], args) -> None:
    if not rows:
        return
    print(f"\nshared prefix, {args.model}: {args.shared_requests} requests of "
          f"{args.shared_prefix} common + {args.shared_own_tokens} own tokens, "
          f"{args.max_tokens} out, all at once; TTFT from submission")
    print(f"{'prefix cache':<14}{'TTFT p50 ms':>12}{'x':>7}{'tok/s':>10}{'x':>7}"
          f"{'hit %':>7}{'preempted':>10}")
    for row in rows:
        hits = (100 * row["prefix_cache_hits"] / row["prefix_cache_queries"]
                if row["prefix_cache_queries"] else 0.0)
        print(f"{'on' if row['prefix_cache'] else 'off':<14}{row['ttft_ms_p50']:>12}"
              f"{str(row.get('x_ttft_p50', '-')):>7}{row['tok_s']:>10}"
              f"{str(row.get('x_tok_s', '-')):>7}{hits:>7.1f}{row['preemptions']:>10}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


if __name__ == "__main__":
    raise SystemExit(main())
