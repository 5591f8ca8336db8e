#!/usr/bin/env bash
# On a CUDA machine: the test suite natively, then the GPU benchmarks.
# Usage: scripts/gpu_check.sh OUTPUT_DIR [STEP ...]
#   STEP: tests | suite | sat | sat-sweep | moe | gemm | gemm-sweep | experts | experts-triton   (default: tests sat moe gemm experts)
#   suite: the whole suite in SUITE_JOBS pytest-xdist processes sharing the GPU, within one command's time
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
step_suite() {  # tests that fail among the parallel processes are then run again alone, to tell contention from a defect
  local jobs=${SUITE_JOBS:-6} rc failed
  OMP_NUM_THREADS=$(( $(nproc) / jobs > 0 ? $(nproc) / jobs : 1 )) \
    gpu_pytest "${TESTS_TIMEOUT:-480}" "$out/pytest_suite.log" -n "$jobs" --dist load tests
  rc=$?
  failed=$(grep -oE '^(FAILED|ERROR) tests/[^ ]+' "$out/pytest_suite.log" | cut -d' ' -f2 | sort -u)
  [ -n "$failed" ] || return $rc
  echo "$(wc -w <<<"$failed") tests failed among $jobs processes; again, one at a time:"
  # shellcheck disable=SC2086
  gpu_pytest "${RERUN_TIMEOUT:-120}" "$out/pytest_suite_rerun.log" -p no:xdist $failed
  echo "the suite failed among $jobs processes (rc=$rc); the failures alone: rc=$?"
  return 1
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
