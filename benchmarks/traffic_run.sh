#!/usr/bin/env bash
# Issue 22's GPU acceptance in one call of the device machine (about 8 minutes on an H100):
# the sampling kernel's tests and timings, the engine greedy and sampled, streamed and sampled
# traffic over HTTP against the engine in-process, and the load tester's own ceiling against
# replay endpoints. Each step has its own time limit; results go to $OUT (default ./gpu-results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# labkit's request schemas need pydantic; a GPU image without it takes it from a carried .wheelhouse
python3 -c "import pydantic" 2>/dev/null \
  || python3 -m pip install -q --no-index --find-links .wheelhouse pydantic
step() { echo; echo "=== $* ($(date +%T))"; }
step card; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
step "sampling kernel tests"
timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_sample_kernel.py 2>&1 | tail -3
step "sampling step alone"
timeout 90 python3 benchmarks/sampling.py --tiles 2048x8 4096x8 8192x16 16384x16 \
  --json "$OUT/sampling.json" > "$OUT/sampling.log" 2>&1; tail -6 "$OUT/sampling.log"
step "engine: greedy, temperature 0.7, top_p 0.9"
timeout 150 python3 benchmarks/engine.py --shapes llama-3.2-3b --concurrency 64 256 512 --no-hf \
  --json "$OUT/engine.json" > "$OUT/engine.log" 2>&1; tail -8 "$OUT/engine.log"
step "over HTTP: /generate and streamed, greedy and 0.7, against in-process"
timeout 270 python3 benchmarks/continuous_serving.py --requests 1024 \
  --json "$OUT/continuous_serving.json" > "$OUT/continuous_serving.log" 2>&1
tail -10 "$OUT/continuous_serving.log"
step "load tester ceiling: 1 and 4 processes against 4 replay endpoints"
timeout 75 python3 benchmarks/loadtest_capacity.py --api openai --concurrency 256 --workers 1 4 \
  --servers 4 --chunk-delay 0.004 --chunks 100 --seconds 4 --json "$OUT/capacity.json" \
  > "$OUT/capacity.log" 2>&1; tail -6 "$OUT/capacity.log"
