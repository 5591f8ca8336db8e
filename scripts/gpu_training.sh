#!/usr/bin/env bash
# On a machine with two CUDA GPUs: the DeepSeek-V3 proxy tables (one GPU; two GPUs at EP2) and
# the 2000-step convergence run (bf16 on GPU 0 and fp8flow on GPU 1 at the same time).
# megatron-core is installed from wheels in .whl/ when it is not importable.
# Usage: scripts/gpu_training.sh OUTPUT_DIR [STEP ...]
#   STEP: proxy1 | proxy2 | converge | converge-bf16 | converge-fp8flow | converge-early |
#         converge-early-blockwise | megatron1 | megatron2
#   (default: proxy1 proxy2). converge needs two GPUs; converge-bf16 and converge-fp8flow run one
#   precision each on one GPU (merge them with fp8flow compare). converge-early: the first 900
#   of the 2000 steps (same schedule, Megatron's exit_interval), bf16 then fp8flow on one GPU;
#   converge-early-blockwise the same for blockwise. stdlib-bf16 / stdlib-fp8flow: the 2000-step
#   run on the python-stdlib text (11.8 M byte tokens, written by fp8flow data), one precision
#   each (merge them with fp8flow compare). megatron1/megatron2: the one-GPU proxy
#   (16 experts) and the EP2 proxy through Megatron's pretrain(), a few iterations.
source "$(dirname "$0")/gpu_common.sh"
cli="python3 -m megatron_fp8flow.cli"
# Proxy tables: short runs (tokens/s from the logged intervals after the first; peak memory).
short="--steps 12 --set log_interval=3 --set global_batch_size=4"

setup() { need_megatron; }
step_proxy1() {
  timeout 200 $cli train proxies/deepseek_v3_proxy_1gpu --compare fp8flow $short --set fp8flow.recompute_experts=true \
    --out "$out/proxy1_recompute" 2>&1 | quiet | tee "$out/proxy1_recompute.log" | grep -v "step " | tail -5
  timeout 420 $cli train proxies/deepseek_v3_proxy_1gpu --compare bf16,blockwise,fp8flow $short --out "$out/proxy1" \
    2>&1 | quiet | tee "$out/proxy1.log" | grep -v "step " | tail -12
  return "${PIPESTATUS[0]}"
}
step_proxy2() {
  timeout 420 $cli train proxies/deepseek_v3_proxy_2gpu --nproc 2 --compare bf16,blockwise,fp8flow $short \
    --out "$out/proxy2" 2>&1 | quiet | tee "$out/proxy2.log" | grep -v "step " | tail -12
  return "${PIPESTATUS[0]}"
}
step_converge() {
  local rec=proxies/deepseek_v3_proxy_1gpu_convergence
  CUDA_VISIBLE_DEVICES=0 timeout 560 $cli train $rec --compare bf16 --out "$out/conv_bf16" > "$out/conv_bf16.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout 560 $cli train $rec --compare fp8flow --out "$out/conv_fp8flow" > "$out/conv_fp8flow.log" 2>&1 &
  wait
  grep "step .*/2000" "$out/conv_fp8flow.log" | tail -2
  $cli compare "$out/conv_bf16" "$out/conv_fp8flow" --out "$out/convergence" 2>&1 | quiet | tee "$out/convergence.log"
  return "${PIPESTATUS[0]}"
}

converge_one() {
  timeout 570 $cli train proxies/deepseek_v3_proxy_1gpu_convergence --compare "$1" --out "$out/conv_$1" \
    > "$out/conv_$1.log" 2>&1
  local rc=$?
  grep "step .*/2000" "$out/conv_$1.log" | tail -2
  return $rc
}
step_converge_bf16() { converge_one bf16; }
converge_part() {  # PRECISION: the first 900 steps of the 2000-step run
  timeout 260 $cli train proxies/deepseek_v3_proxy_1gpu_convergence --compare "$1" --set exit_interval=900 \
    --out "$out/early_$1" > "$out/early_$1.log" 2>&1
  local rc=$?
  grep "step .*/2000" "$out/early_$1.log" | awk 'NR % 15 == 0' | cut -c1-120
  return $rc
}
step_converge_early() {
  converge_part bf16 && converge_part fp8flow || return $?
  $cli compare "$out/early_bf16" "$out/early_fp8flow" --out "$out/early" 2>&1 | quiet | tail -8
}
step_converge_early_blockwise() { converge_part blockwise; }
stdlib_one() {
  local data=/tmp/fp8flow_data/stdlib
  [ -f "$data.idx" ] || $cli data "$data" --corpus python-stdlib 2>&1 | quiet | tail -1
  timeout 540 $cli train proxies/deepseek_v3_proxy_1gpu_convergence --compare "$1" --set data_path="$data" \
    --out "$out/stdlib_$1" > "$out/stdlib_$1.log" 2>&1
  local rc=$?
  grep "step .*/2000" "$out/stdlib_$1.log" | awk 'NR % 25 == 0' | cut -c1-120
  return $rc
}
step_stdlib_bf16() { stdlib_one bf16; }
step_stdlib_fp8flow() { stdlib_one fp8flow; }
step_converge_fp8flow() { converge_one fp8flow; }
# Through pretrain(): iteration times and losses in Megatron's own log lines.
megatron_proxy() {
  local name=$1 nproc=$2
  shift 2
  timeout 280 $cli train "proxies/$name" --megatron --nproc "$nproc" --compare bf16,fp8flow --steps 12 \
    --set lr_warmup_iters=2 --set log_interval=3 --set eval_iters=1 --set eval_interval=1000 "$@" \
    > "$out/megatron_$name.log" 2>&1
  local rc=$?
  grep -E "iteration +(6|9|12)/|Error|error:" "$out/megatron_$name.log" | cut -c1-260 | tail -8
  return $rc
}
step_megatron1() { megatron_proxy deepseek_v3_proxy_1gpu 1 --set num_experts=16; }
step_megatron2() { megatron_proxy deepseek_v3_proxy_2gpu 2 --set num_experts=32 --set global_batch_size=4; }

gpu_main "proxy1 proxy2" "$@"
