#!/usr/bin/env bash
# On a machine with N CUDA GPUs (eight for the paper's intra-node EP8 figures): the FP8 dispatch
# against the bf16 all-to-all, one DeepSeek-V3 MoE layer (32 experts per GPU), and the N-GPU
# DeepSeek-V3 proxy (compact loop, EP = N), bf16 against fp8flow. megatron-core is installed
# from wheels in .whl/ when it is not importable. Results and logs go to OUTPUT_DIR.
# Usage: scripts/gpu_ep8.sh OUTPUT_DIR [STEP ...]   STEP: dispatch | layer | proxy (default: all)
source "$(dirname "$0")/gpu_common.sh"

setup() {
  need_megatron
  n=$(python3 -c "import torch; print(torch.cuda.device_count())")
  [ "$n" -ge 2 ] || { echo "needs at least two GPUs, found $n" >&2; return 2; }
  recipe=proxies/deepseek_v3_proxy_8gpu
  [ "$n" -eq 8 ] || recipe=proxies/deepseek_v3_proxy_2gpu  # a dry run on fewer GPUs uses the EP2 proxy
}
step_dispatch() {
  timeout 300 torchrun --standalone --nproc_per_node "$n" -m megatron_fp8flow.benchmarks.dispatch "$out" \
    2>&1 | quiet | tee "$out/dispatch.log" | tail -8
  return "${PIPESTATUS[0]}"
}
step_layer() {
  timeout 400 torchrun --standalone --nproc_per_node "$n" -m megatron_fp8flow.benchmarks.moe_layer "$out" \
    2>&1 | quiet | tee "$out/moe_layer.log" | tail -8
  return "${PIPESTATUS[0]}"
}
step_proxy() {
  timeout 500 python3 -m megatron_fp8flow.cli train $recipe --nproc "$n" --compare bf16,fp8flow \
    --steps 12 --set log_interval=3 --set global_batch_size=$((4 * n)) --set expert_model_parallel_size="$n" \
    --out "$out/proxy" 2>&1 | quiet | tee "$out/proxy.log" | grep -v "step " | tail -8
  return "${PIPESTATUS[0]}"
}

gpu_main "dispatch layer proxy" "$@"
