#!/usr/bin/env bash
# 2000 steps of the one-GPU proxy in bf16 and in fp8flow, then the paper's convergence check
# (smoothed loss within 0.25% over the last half). With two GPUs both run at once.
set -euo pipefail
recipe=proxies/deepseek_v3_proxy_1gpu_convergence
if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  CUDA_VISIBLE_DEVICES=0 fp8flow train $recipe --compare bf16 --out conv_bf16 "$@" &
  CUDA_VISIBLE_DEVICES=1 fp8flow train $recipe --compare fp8flow --out conv_fp8flow "$@" &
  wait
else
  fp8flow train $recipe --compare bf16 --out conv_bf16 "$@"
  fp8flow train $recipe --compare fp8flow --out conv_fp8flow "$@"
fi
fp8flow compare conv_bf16 conv_fp8flow --out convergence
