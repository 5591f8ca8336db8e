#!/usr/bin/env bash
# On a CUDA machine: the test suite natively, then the GPU benchmarks.
# Usage: scripts/gpu_check.sh OUTPUT_DIR [STEP ...]
#   STEP: tests | sat | sat-sweep | moe | gemm | gemm-sweep | experts | experts-triton   (default: tests sat moe gemm experts)
# Logs and JSON results go to OUTPUT_DIR. Steps can be split over several calls to stay
# within a time limit per command.
source "$(dirname "$0")/gpu_common.sh"
cli="python3 -m megatron_fp8flow.cli"

setup() {
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
}
step_tests() {
  gpu_pytest "${TESTS_TIMEOUT:-3000}" "$out/pytest.log" tests
}
step_sat() { $cli bench sat --out "$out" 2>&1 | tee "$out/bench_sat.log"; return "${PIPESTATUS[0]}"; }
step_sat_sweep() { $cli bench sat --sweep --out "$out" 2>&1 | tee "$out/bench_sat.log"; return "${PIPESTATUS[0]}"; }
step_moe() { $cli bench moe --out "$out" 2>&1 | tee "$out/bench_moe.log"; return "${PIPESTATUS[0]}"; }
step_gemm() { $cli bench gemm --out "$out" 2>&1 | tee "$out/bench_gemm.log"; return "${PIPESTATUS[0]}"; }
step_gemm_sweep() { $cli bench gemm --sweep --out "$out" 2>&1 | tee "$out/bench_gemm.log"; return "${PIPESTATUS[0]}"; }
step_experts() { $cli bench experts --out "$out" 2>&1 | tee "$out/bench_experts.log"; return "${PIPESTATUS[0]}"; }
step_experts_triton() {
  $cli bench experts --gemm-backend triton --out "$out/triton" 2>&1 | tee "$out/bench_experts_triton.log"
  return "${PIPESTATUS[0]}"
}

gpu_main "tests sat moe gemm experts" "$@"
