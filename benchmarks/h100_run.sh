#!/usr/bin/env bash
# The GPU acceptance runs, one section per call of the device machine (each fits in 10 minutes):
#   bash benchmarks/h100_run.sh checks     # labkit info, pytest -m gpu, labkit generate, monitor vs dmon
#   bash benchmarks/h100_run.sh timeline   # the seed's load test under the NVML timeline (issues 3, 4)
#   bash benchmarks/h100_run.sh notebooks  # execute notebooks with stored outputs (make gpu-outputs)
#   bash benchmarks/h100_run.sh serving    # batching engine + sequential vs batched serving (issue 6)
# Results go to $OUT (default ./gpu-results), packed into one results.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
RES=$OUT/res
mkdir -p "$RES"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
MODEL=${MODEL:-synthetic:llama-3.2-3b}
step() { echo; echo "=== $* ($(date +%T))"; }

case "${1:-checks}" in
checks)
  step info; nvidia-smi -L; python3 -m labkit info
  step "pytest -m gpu"
  timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tee "$RES/pytest_gpu.txt" | tail -25
  step "labkit generate $MODEL"
  timeout 120 python3 -m labkit generate "Suggest a skincare routine" --model "$MODEL" \
    --max-tokens 150 --temperature 0 2>&1 | tee "$RES/generate_3b.txt" | grep -v '^$' | tail -22
  step "monitor vs nvidia-smi dmon"
  timeout 150 python3 benchmarks/monitor_vs_dmon.py --json "$RES/monitor_vs_dmon.json" 2>&1 \
    | tee "$RES/monitor_vs_dmon.txt" | tail -12
  ;;
timeline)
  step "gpu_timeline: seed load test (c=5, 50 requests, 150 tokens) with idle around it"
  timeout 560 python3 benchmarks/gpu_timeline.py --model "$MODEL" --idle "${IDLE:-30}" \
    --png "$RES/gpu_timeline_h100.png" --max-seconds 540 2>&1 | tee "$RES/gpu_timeline.txt" | tail -60
  ;;
notebooks)
  step "notebooks ${NOTEBOOKS:-notebooks/0[0-5]*.ipynb}"
  mkdir -p "$RES/notebooks"
  # shellcheck disable=SC2086
  timeout 570 python3 -m labkit.course.nbrun ${NOTEBOOKS:-notebooks/0[0-5]*.ipynb} --out "$RES/notebooks" \
    --timeout 500 2>&1 | tail -40
  cp -r results "$RES/" 2>/dev/null
  ;;
serving)
  step "batching engine"
  timeout 200 python3 benchmarks/batching_engine.py --max-seconds 180 --json "$RES/batching_engine.json" \
    2>&1 | tee "$RES/batching_engine.txt" | tail -20
  step "serving: sequential vs batched"
  timeout 380 python3 benchmarks/serving.py --model "$MODEL" --json "$RES/serving.json" 2>&1 \
    | tee "$RES/serving.txt" | tail -25
  ;;
esac
tar czf "$OUT/results.tgz" -C "$OUT" res && rm -rf "$RES"
