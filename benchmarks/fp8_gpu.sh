#!/usr/bin/env bash
# Issue 25's FP8 weights on the GPU in one call of the device machine (each step has its own time
# limit: under 10 minutes in all): the FP8 GPU tests, the accuracy benchmark, the
# engine at batch 1 for the 1B / 3B / 8B shapes in bf16 and FP8 against each one's floor, 512
# concurrent 3B requests with bf16 and FP8 weights, each over a bf16 and an FP8 KV cache, and the
# shared-prefix workload (512 requests of 1,000 common + 20 own tokens) with the prefix cache off
# and on. Results go to $OUT (default ./gpu-results); the table of targets is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --find-links .wheelhouse pydantic
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
step() { echo; echo "=== $* ($(date +%T))"; }
step card; nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader
step "FP8 GPU tests"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_quant.py \
  tests/test_gpu_kv_fp8.py \
  > "$OUT/test_gpu_quant.log" 2>&1; tail -15 "$OUT/test_gpu_quant.log"
step "accuracy: embedded model perplexity and greedy agreement, synthetic 1B logits"
timeout 90 python3 benchmarks/fp8_accuracy.py --json "$OUT/fp8_accuracy.json" \
  > "$OUT/fp8_accuracy.log" 2>&1; tail -16 "$OUT/fp8_accuracy.log"
step "engine, batch 1: 1B, 3B, 8B in bf16 and fp8"
timeout 150 python3 benchmarks/engine.py --shapes llama-3.2-1b llama-3.2-3b llama-3.1-8b \
  --concurrency --no-hf --quantization bf16 fp8 --shared-prefix 0 \
  --json "$OUT/engine_batch1.json" \
  > "$OUT/engine_batch1.log" 2>&1; tail -9 "$OUT/engine_batch1.log"
step "engine, 512 concurrent 3B: bf16 and fp8 (_scaled_mm), KV cache bf16 and fp8; shared prefix"
timeout 240 python3 benchmarks/engine.py --shapes --model synthetic:llama-3.2-3b \
  --concurrency 512 --no-hf --no-sampled --quantization bf16 fp8 --fp8-matmul scaled_mm \
  --kv-cache-dtype auto fp8 \
  --json "$OUT/engine_512.json" > "$OUT/engine_512.log" 2>&1; tail -6 "$OUT/engine_512.log"
step "targets"
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None

rows = []  # (what, value, target, met)
batch1, many = load("engine_batch1.json"), load("engine_512.json")
accuracy = load("fp8_accuracy.json")
if batch1:
    print(f"{batch1['card']}, copy {batch1['copy_bandwidth_tb_s']} TB/s")
    for row in batch1["batch1"]:
        if row["quantization"] == "fp8":
            name = row["model"].removeprefix("synthetic:")
            rows.append((f"{name} fp8 batch 1: {row['ms_per_token']} ms, x its floor "
                         f"{row['floor_ms']} ms", row["x_floor"], "<= 1.3",
                         row["x_floor"] <= 1.3 if "3b" in name else None))
            rows.append((f"{name} fp8 batch 1, x faster than bf16", row.get("x_bf16"), ">= 1.6",
                         (row.get("x_bf16") or 0) >= 1.6 if "3b" in name else None))
if many:
    for row in many["throughput"]:
        if row.get("concurrency") and row["quantization"] == "fp8":
            kv = "+kv fp8" if row.get("kv_cache_dtype") == "fp8" else ""
            rows.append((f"{row['concurrency']} concurrent fp8/{row['matmul']}{kv}: "
                         f"{row['tok_s']} tok/s, x bf16",
                         row.get("x_bf16"), ">= 1.3", (row.get("x_bf16") or 0) >= 1.3))
    for row in many.get("shared_prefix", []):
        if row["prefix_cache"]:
            rows.append((f"shared prefix, cache on: TTFT p50 {row['ttft_ms_p50']} ms, x lower",
                         row["x_ttft_p50"], ">= 5", row["x_ttft_p50"] >= 5))
            rows.append((f"shared prefix, cache on: {row['tok_s']} tok/s, x off; same greedy "
                         f"{row['same_greedy_output']}", row["x_tok_s"], ">= 1.5",
                         row["x_tok_s"] >= 1.5))
if accuracy:
    for dtype, variants in accuracy["embedded"].items():
        for name, row in variants.items():
            if name != "reference":
                rows.append((f"embedded {name} ({dtype}): perplexity x reference; greedy "
                             f"prefix {row['matched_prefix_mean']}, exact {row['exact_match']}",
                             row["ppl_vs_reference"], "<= 1.01", row["ppl_vs_reference"] <= 1.01))
print(f"{'what':<78}{'value':>8}  {'target':<8}met")
for what, value, target, met in rows:
    print(f"{what:<78}{str(value):>8}  {target:<8}{'-' if met is None else 'yes' if met else 'NO'}")
EOF
