#!/usr/bin/env bash
# On a machine with N CUDA GPUs (eight for the paper's intra-node EP8 figures): the FP8 dispatch
# against the bf16 all-to-all, one DeepSeek-V3 MoE layer (32 experts per GPU), and the N-GPU
# DeepSeek-V3 proxy (compact loop, EP = N), bf16 against fp8flow. megatron-core is installed
# from wheels in .whl/ when it is not importable. Results and logs go to OUTPUT_DIR.
# Usage: scripts/gpu_ep8.sh OUTPUT_DIR [STEP ...]   STEP: dispatch | layer | proxy (default: all)
set -uo pipefail
out=${1:-gpu_results}
shift || true
steps=${*:-dispatch layer proxy}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
if ! python3 -c "import megatron.core" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
n=$(python3 -c "import torch; print(torch.cuda.device_count())")
recipe=proxies/deepseek_v3_proxy_8gpu
[ "$n" -eq 8 ] || recipe=proxies/deepseek_v3_proxy_2gpu   # a dry run on fewer GPUs uses the EP2 proxy
[ "$n" -ge 2 ] || { echo "needs at least two GPUs, found $n" >&2; exit 2; }
quiet() { grep -v -i "warn\|Unknown MLP\|DEPRECATED\|^\s*$"; }
rc=0
for step in $steps; do
  case $step in
    dispatch) timeout 300 torchrun --standalone --nproc_per_node "$n" -m megatron_fp8flow.benchmarks.dispatch "$out" \
                2>&1 | quiet | tee "$out/dispatch.log" | tail -8 ;;
    layer) timeout 400 torchrun --standalone --nproc_per_node "$n" -m megatron_fp8flow.benchmarks.moe_layer "$out" \
             2>&1 | quiet | tee "$out/moe_layer.log" | tail -8 ;;
    proxy) timeout 500 python3 -m megatron_fp8flow.cli train $recipe --nproc "$n" --compare bf16,fp8flow \
             --steps 12 --set log_interval=3 --set global_batch_size=$((4 * n)) --set expert_model_parallel_size="$n" \
             --out "$out/proxy" 2>&1 | quiet | tee "$out/proxy.log" | grep -v "step " | tail -8 ;;
    *) echo "unknown step $step" >&2; rc=2; continue ;;
  esac
  step_rc=${PIPESTATUS[0]}
  echo "step $step rc=$step_rc"
  rc=$(( rc || step_rc ))
done
exit $rc
