"""What FP8 weights cost in accuracy, measured: the embedded model's held-out perplexity and
greedy agreement, and the logit error on a synthetic shape, for each FP8 recipe against the
model's own weights, in the same run.

Variants (`labkit.engine.quant`), each against the same dtype's reference:

- fp8:          products' weights and lm_head in FP8, activations in the model's dtype (W8A16:
                what a batch-1 step's GEMV kernels compute; `matmul="dequant"`);
- fp8 w8a8:     the same weights, and each token's inputs to a product rounded to FP8 with its
                own scale (what `torch._scaled_mm` computes for steps of more tokens);
- fp8 bf16-head: W8A16 with lm_head kept in the model's dtype;
- kv fp8:       the model's own weights, the KV cache in FP8 (`kv_cache_dtype="fp8"`);
- fp8 + kv fp8: W8A16 weights and the FP8 KV cache (W8A8 at larger batches: `fp8 w8a8`'s
                rounding on top).

1. Perplexity over the answer tokens of the first --heldout held-out pairs of the embedded
   model's corpus (`labkit.train`: the same seed, split and loss mask as its model card's
   held-out loss), every position scored by the compact Llama in one forward per batch.
2. Greedy agreement: each prompt (held-out questions and the model card's prompts) decoded
   greedily by the continuous engine up to --max-tokens; per prompt, the share of the reference's
   tokens matched before the first divergence, and whether the whole output is identical.
   The yardstick: bf16 arithmetic's own agreement with float32 (both references, same prompts).
3. Logits of --rows random prompts of --tokens tokens and one decode step after them, on
   `synthetic:<--synthetic>` (random weights, real widths; --synthetic-layers layers, all by
   default on a GPU, 2 on the CPU): max and mean absolute error, relative error (‖Δ‖ / ‖ref‖),
   top-1 agreement.

On the CPU the reference is float32 arithmetic over the model's bf16-exact weights (the embedded
model is stored in bf16; the synthetic one is made in bf16), and the FP8 variants dequantize
eagerly: the same rounding the GPU's kernels do, so FP8's own cost is what shows. --dtypes adds
bf16 arithmetic as a second reference (CPU default: fp32 bf16; GPU: bf16).

    python benchmarks/fp8_accuracy.py [--device auto] [--heldout 400] [--prompts 24]
        [--synthetic llama-3.2-1b] [--synthetic-layers N] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import time

import torch
from transformers import AutoModelForCausalLM

from labkit.engine import quant, synthetic
from labkit.engine.continuous import ContinuousEngine
from labkit.engine.kv_cache import FP8, PagedKVCache
from labkit.engine.llama import Llama
from labkit.engine.model import load_model, resolve_device
from labkit.engine.request import Request
from labkit.engine.runner import Chunk, ModelRunner, unpack
from labkit.train import SAMPLE_PROMPTS, corpus, trainer

# name -> (quantization, matmul, FP8 lm_head, FP8 KV cache)
VARIANTS = {"fp8": ("fp8", "dequant", True, False),
            "fp8 w8a8": ("fp8", "scaled_mm", True, False),
            "fp8 bf16-head": ("fp8", "dequant", False, False),
            "kv fp8": (None, None, False, True),
            "fp8 + kv fp8": ("fp8", "dequant", True, True)}
PAGE = 16


def build(hf_model, variant: str | None) -> tuple[Llama, torch.dtype]:
    """The compact Llama over `hf_model`'s weights, as they are or as a VARIANTS entry, and
    the dtype its KV cache stores."""
    dtype = hf_model.model.embed_tokens.weight.dtype
    if variant is None:
        return Llama.from_hf(hf_model), dtype
    method, matmul, fp8_head, fp8_kv = VARIANTS[variant]
    model = Llama.from_hf(hf_model, quantization=method, fp8_lm_head=fp8_head)
    if method:
        quant.set_matmul(model, matmul)
    return model, FP8 if fp8_kv else dtype


def heldout_pairs(count: int, examples: int, seed: int) -> list:
    """The first `count` held-out pairs, split as `labkit build-model` split them (the model
    card's corpus: `examples` pairs from `seed`, exact repeats dropped, shuffled, 2 % held out)."""
    pairs = list(dict.fromkeys(corpus.generate_corpus(examples, seed=seed)))
    random.Random(seed).shuffle(pairs)
    return pairs[:max(50, len(pairs) // 50)][:count]


def all_logits(model: Llama, batch: list[list[int]], config, device, kv_dtype
               ) -> torch.Tensor:
    """(rows, tokens, vocab) logits at every position of each sequence (right-padded)."""
    width = max(len(ids) for ids in batch)
    pages = -(-width // PAGE)
    cache = PagedKVCache(config, len(batch) * pages + 1, kv_dtype, device, page_size=PAGE)
    chunks = [Chunk(ids, 0, list(range(1 + row * pages, 1 + (row + 1) * pages)))
              for row, ids in enumerate(batch)]
    packed = ModelRunner(model, cache, cuda_graphs=False)._pack(chunks, len(batch), width, pages)
    with torch.inference_mode():
        return model(*unpack(packed, width)[:4], None, cache)


def perplexity(model: Llama, seqs: list[tuple[list[int], int]], config, device,
               batch_size: int, kv_dtype) -> dict:
    """exp(mean cross-entropy per answer token), the answer's closing EOS included."""
    total, count = 0.0, 0
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start:start + batch_size]
        logits = all_logits(model, [ids for ids, _ in batch], config, device, kv_dtype).float()
        for row, (ids, prompt) in enumerate(batch):
            targets = torch.tensor(ids[prompt:], device=device)
            scores = logits[row, prompt - 1:len(ids) - 1].log_softmax(-1)
            total -= float(scores.gather(1, targets[:, None]).sum())
            count += len(targets)
    return {"loss": round(total / count, 5), "perplexity": round(math.exp(total / count), 5),
            "tokens": count}


def greedy(lm, model: Llama, prompts: list[str], max_tokens: int, kv_dtype
           ) -> list[list[int]]:
    cache = PagedKVCache(lm.config, len(prompts) * (-(-(max_tokens + 64) // PAGE)) + 1,
                         kv_dtype, lm.device, page_size=PAGE)
    engine = ContinuousEngine(lm, model, cache, max_running=len(prompts))
    return [r.token_ids for r in engine.generate([Request(p, max_tokens, 0) for p in prompts])]


def agreement(reference: list[list[int]], got: list[list[int]]) -> dict:
    """Share of each reference's tokens matched before the first divergence (mean, min), and
    the share of outputs identical throughout."""
    prefixes = []
    for want, have in zip(reference, got, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(want, have, strict=False))
                     if a != b),
                    min(len(want), len(have)))
        prefixes.append(same / max(len(want), 1))
    return {"matched_prefix_mean": round(sum(prefixes) / len(prefixes), 4),
            "matched_prefix_min": round(min(prefixes), 4),
            "exact_match": round(sum(a == b for a, b in zip(reference, got, strict=True))
                                 / len(got), 4)}


def logit_error(want: torch.Tensor, got: torch.Tensor) -> dict:
    want, got = want.float(), got.float()
    diff = (got - want).abs()
    return {"max_abs": round(float(diff.max()), 5), "mean_abs": round(float(diff.mean()), 6),
            "relative": round(float((got - want).norm() / want.norm()), 6),
            "ref_max_abs": round(float(want.abs().max()), 4),
            "top1_agree": round(float((got.argmax(-1) == want.argmax(-1)).float().mean()), 4)}


def embedded(args, device, dtype: str, pairs, prompts) -> tuple[dict, list[list[int]]]:
    """Perplexity and greedy agreement of each variant on the embedded model in `dtype`; and
    the reference's greedy tokens."""
    lm = load_model("model", device=device, dtype=dtype)
    seqs = trainer.encode(lm.tokenizer, pairs)
    rows, reference = {}, None
    for variant in (None, *VARIANTS):
        began = time.perf_counter()
        model, kv_dtype = build(lm.model, variant)
        row = perplexity(model, seqs, lm.config, lm.device, args.batch_size, kv_dtype)
        tokens = greedy(lm, model, prompts, args.max_tokens, kv_dtype)
        if variant is None:
            reference, base = tokens, row["perplexity"]
        row.update(agreement(reference, tokens))
        row["ppl_vs_reference"] = round(row["perplexity"] / base, 5)
        row["seconds"] = round(time.perf_counter() - began, 1)
        rows[variant or "reference"] = row
        print(f"  {dtype} {variant or 'reference'}: {row}", flush=True)
    return rows, reference


def synthetic_logits(args, device, dtype: str) -> dict:
    """Logit error of each variant on a synthetic shape: a prefill, then a one-token step."""
    config = synthetic.synthetic_config(args.synthetic)
    if args.synthetic_layers:
        config.num_hidden_layers = args.synthetic_layers
    torch.manual_seed(0)
    with torch.device(device):  # made in bf16: the weights are bf16-exact in every dtype
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    hf = hf.to(torch_dtype(dtype)).eval()
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, config.vocab_size, (args.rows, args.tokens),
                            generator=generator).tolist()
    outputs, rows = {}, {}
    for variant in (None, *VARIANTS):
        model, kv_dtype = build(hf, variant)
        prefill = all_logits(model, prompts, config, device, kv_dtype)
        outputs[variant] = (prefill[:, -1],
                            decode_step(model, prompts[0], config, device, kv_dtype))
        del model
    for variant in VARIANTS:
        rows[variant] = {"prefill_last": logit_error(outputs[None][0], outputs[variant][0]),
                         "decode_step": logit_error(outputs[None][1], outputs[variant][1])}
        print(f"  {dtype} {variant}: {rows[variant]}", flush=True)
    return {"shape": args.synthetic, "layers": config.num_hidden_layers, "rows": args.rows,
            "tokens": args.tokens, "variants": rows}


def decode_step(model: Llama, ids: list[int], config, device, kv_dtype) -> torch.Tensor:
    """Logits of one more token after `ids`, as a one-row decode step (the GEMV path on CUDA)."""
    pages = -(-(len(ids) + 1) // PAGE)
    cache = PagedKVCache(config, pages + 1, kv_dtype, device, page_size=PAGE)
    runner = ModelRunner(model, cache, cuda_graphs=False)
    table = list(range(1, pages + 1))
    with torch.inference_mode():
        runner.prefill([Chunk(ids, 0, table)])
        return runner.decode([Chunk([ids[-1]], len(ids), table)])[0]


def torch_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtypes", nargs="*", choices=["fp32", "bf16"], default=None,
                        help="arithmetic of each reference (CPU default: fp32 bf16; GPU: bf16)")
    parser.add_argument("--heldout", type=int, default=400, help="held-out pairs scored")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=24,
                        help="greedy prompts: the model card's, then held-out questions")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--corpus-examples", type=int, default=300_000,
                        help="pairs the embedded model's corpus was generated with (its card)")
    parser.add_argument("--seed", type=int, default=0, help="the corpus's seed (its card)")
    parser.add_argument("--synthetic", default="llama-3.2-1b", choices=sorted(synthetic.SHAPES))
    parser.add_argument("--synthetic-layers", type=int, default=None,
                        help="layers of the synthetic shape (default: all on a GPU, 2 on the "
                             "CPU); its widths and vocabulary stay the real ones")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    quant.check_supported(device)
    cpu = device.type == "cpu"
    dtypes = args.dtypes or (["fp32", "bf16"] if cpu else ["bf16"])
    if args.synthetic_layers is None and cpu:
        args.synthetic_layers = 2
    card = "CPU" if cpu else torch.cuda.get_device_name(device)
    pairs = heldout_pairs(args.heldout, args.corpus_examples, args.seed)
    questions = list(dict.fromkeys(pair.prompt for pair in pairs))
    prompts = ([p for p, _ in SAMPLE_PROMPTS] + questions)[:args.prompts]
    report = {"card": card, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "path": "eager dequantize (CPU)" if cpu else "CUDA kernels",
              "heldout_pairs": len(pairs), "prompts": len(prompts),
              "max_tokens": args.max_tokens, "embedded": {}, "synthetic": {}}
    print(f"{card}: {len(pairs)} held-out pairs, {len(prompts)} greedy prompts", flush=True)
    greedy_tokens = {}
    for dtype in dtypes:
        report["embedded"][dtype], greedy_tokens[dtype] = embedded(args, device, dtype, pairs,
                                                                   prompts)
        report["synthetic"][dtype] = synthetic_logits(args, device, dtype)
    if {"fp32", "bf16"} <= set(dtypes):  # the yardstick: what bf16 rounding alone changes
        report["bf16_vs_fp32"] = {
            "ppl_ratio": round(report["embedded"]["bf16"]["reference"]["perplexity"]
                               / report["embedded"]["fp32"]["reference"]["perplexity"], 5),
            **agreement(greedy_tokens["fp32"], greedy_tokens["bf16"])}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print_tables(report)
    return 0


def print_tables(report: dict) -> None:
    print(f"\n{report['card']} ({report['path']}), embedded model: perplexity over "
          f"{report['heldout_pairs']} held-out pairs; greedy over {report['prompts']} prompts")
    print(f"{'dtype':<6}{'variant':<15}{'ppl':>9}{'x ref':>9}{'prefix':>8}{'min':>7}{'exact':>7}")
    for dtype, rows in report["embedded"].items():
        for name, row in rows.items():
            print(f"{dtype:<6}{name:<15}{row['perplexity']:>9.4f}{row['ppl_vs_reference']:>9.4f}"
                  f"{row['matched_prefix_mean']:>8.3f}{row['matched_prefix_min']:>7.3f}"
                  f"{row['exact_match']:>7.2f}")
    if "bf16_vs_fp32" in report:
        row = report["bf16_vs_fp32"]
        print(f"{'bf16':<6}{'vs fp32':<15}{'':>9}{row['ppl_ratio']:>9.4f}"
              f"{row['matched_prefix_mean']:>8.3f}{row['matched_prefix_min']:>7.3f}"
              f"{row['exact_match']:>7.2f}")
    for dtype, run in report["synthetic"].items():
        print(f"\nsynthetic:{run['shape']} ({run['layers']} layers), {dtype}: logits against "
              f"the reference")
        print(f"{'variant':<15}{'where':<14}{'max abs':>9}{'mean abs':>10}{'relative':>10}"
              f"{'top-1':>7}")
        for name, row in run["variants"].items():
            for where, error in row.items():
                print(f"{name:<15}{where:<14}{error['max_abs']:>9.4f}{error['mean_abs']:>10.5f}"
                      f"{error['relative']:>10.5f}{error['top1_agree']:>7.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
