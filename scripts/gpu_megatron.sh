#!/usr/bin/env bash
# On a machine with two CUDA GPUs: the Megatron integration tests (EP=1 and EP=2 with NCCL),
# the cast audit at EP=2, the FP8-vs-bf16 dispatch benchmark and the whole-MoE-layer benchmark
# on one and two GPUs. megatron-core is installed from wheels in .whl/ when it is not importable.
# Usage: scripts/gpu_megatron.sh OUTPUT_DIR [STEP ...]
#   STEP: tests | audit | dispatch | layer1 | layer2   (default: tests audit dispatch layer1 layer2)
source "$(dirname "$0")/gpu_common.sh"

setup() {
  need_megatron
  python3 -c "import megatron.core, torch; print('megatron-core', megatron.core.__version__, 'torch', torch.__version__, 'gpus', torch.cuda.device_count())" | tee "$out/env.txt"
}
step_tests() {
  gpu_pytest 420 "$out/pytest_megatron.log" tests/test_megatron.py
}
step_audit() {
  timeout 200 python3 -m megatron_fp8flow.cli audit --ep 2 --json "$out/audit.json" 2>&1 | quiet | tee "$out/audit.log" | tail -12
  return "${PIPESTATUS[0]}"
}
step_dispatch() {
  timeout 200 torchrun --nproc_per_node 2 -m megatron_fp8flow.benchmarks.dispatch "$out" 2>&1 | quiet | tee "$out/dispatch.log" | tail -8
  return "${PIPESTATUS[0]}"
}
step_layer1() {
  timeout 300 torchrun --nproc_per_node 1 -m megatron_fp8flow.benchmarks.moe_layer "$out" 2>&1 | quiet | tee "$out/moe_layer1.log" | tail -9
  return "${PIPESTATUS[0]}"
}
step_layer2() {
  timeout 300 torchrun --nproc_per_node 2 -m megatron_fp8flow.benchmarks.moe_layer "$out" 2>&1 | quiet | tee "$out/moe_layer2.log" | tail -9
  return "${PIPESTATUS[0]}"
}

gpu_main "tests audit dispatch layer1 layer2" "$@"
