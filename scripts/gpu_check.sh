#!/usr/bin/env bash
# On a CUDA machine: the test suite natively, then the GPU benchmarks.
# Usage: scripts/gpu_check.sh OUTPUT_DIR [STEP ...]
#   STEP: tests | sat | sat-sweep | moe | gemm | gemm-sweep | experts | experts-triton   (default: tests sat moe gemm experts)
# Logs and JSON results go to OUTPUT_DIR. Steps can be split over several calls to stay
# within a time limit per command.
set -uo pipefail
out=${1:-gpu_results}
shift || true
steps=${*:-tests sat moe gemm experts}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
rc=0
for step in $steps; do
  case $step in
    tests) timeout "${TESTS_TIMEOUT:-3000}" python3 -m pytest tests -q -p no:cacheprovider -rs 2>&1 \
        | tee "$out/pytest.log" | tail -25 ;;
    sat) python3 -m megatron_fp8flow.cli bench sat --out "$out" 2>&1 | tee "$out/bench_sat.log" ;;
    sat-sweep) python3 -m megatron_fp8flow.cli bench sat --sweep --out "$out" 2>&1 | tee "$out/bench_sat.log" ;;
    moe) python3 -m megatron_fp8flow.cli bench moe --out "$out" 2>&1 | tee "$out/bench_moe.log" ;;
    gemm) python3 -m megatron_fp8flow.cli bench gemm --out "$out" 2>&1 | tee "$out/bench_gemm.log" ;;
    gemm-sweep) python3 -m megatron_fp8flow.cli bench gemm --sweep --out "$out" 2>&1 | tee "$out/bench_gemm.log" ;;
    experts) python3 -m megatron_fp8flow.cli bench experts --out "$out" 2>&1 | tee "$out/bench_experts.log" ;;
    experts-triton) python3 -m megatron_fp8flow.cli bench experts --gemm-backend triton --out "$out/triton" 2>&1 \
        | tee "$out/bench_experts_triton.log" ;;
    *) echo "unknown step $step" >&2; rc=2; continue ;;
  esac
  step_rc=${PIPESTATUS[0]}
  echo "step $step rc=$step_rc"
  rc=$(( rc || step_rc ))
done
exit $rc
