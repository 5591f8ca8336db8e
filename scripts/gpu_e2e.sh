#!/usr/bin/env bash
# End to end on one Hopper GPU: the whole MoE layer, the DeepSeek-V3 proxy (compact loop), its
# memory at the peak, Megatron's pretrain(), and test files natively.
#   bash scripts/gpu_e2e.sh OUT_DIR [layer] [layer-stacked] [layer-param] [layer-microbatches] [breakdown] [proxy] [proxy-profile] [proxy-mbs4] [memory]
#        [pretrain] [pretrain-memory] [tests]
# megatron-core from .whl/ and deep_gemm from .dgw/ when they are not importable (see
# gpu_common.sh and gpu_deepgemm.sh; DG_PRELOAD_LIBSTDCXX=1 where the toolchain needs it).
# TEST_FILES picks the test files; PROXY_STEPS / PRETRAIN_ITERS size the runs; PROXY_SET (proxy steps) and
# MEMORY_SET (memory steps) add recipe settings; MEMORY_TAG suffixes the memory step's output names.
source "$(dirname "$0")/gpu_common.sh"
cli="python3 -m megatron_fp8flow.cli"

setup() {
  need_megatron
  need_deepgemm || return 1
  python3 -c "import megatron.core, torch, deep_gemm; print('megatron-core', megatron.core.__version__, 'deep_gemm', deep_gemm.__version__, torch.cuda.get_device_name())"
}
layer() {
  timeout "${LAYER_TIMEOUT:-240}" torchrun --nproc_per_node 1 -m megatron_fp8flow.benchmarks.moe_layer "$out/moe_layer" \
    --grads "$1" 2>&1 | quiet | tee "$out/moe_layer_$1.log" | tail -8
  return "${PIPESTATUS[0]}"
}
step_layer() { layer main_grad; }
step_layer_stacked() { layer main_grad_stacked; }
step_layer_param() { layer param; }
step_layer_microbatches() {  # N microbatches per step, as in training: the FP8 weights quantized once per step
  timeout "${LAYER_TIMEOUT:-240}" torchrun --nproc_per_node 1 -m megatron_fp8flow.benchmarks.moe_layer "$out/moe_layer" \
    --microbatches "${LAYER_MICROBATCHES:-8}" 2>&1 | quiet | tee "$out/moe_layer_microbatches.log" | tail -8
  return "${PIPESTATUS[0]}"
}
step_breakdown() {
  timeout 200 torchrun --nproc_per_node 1 -m megatron_fp8flow.benchmarks.moe_layer "$out/moe_layer" \
    --breakdown "${BREAKDOWN_MODES:-bf16,flow}" 2>&1 | quiet | tee "$out/breakdown.log" | tail -40
  return "${PIPESTATUS[0]}"
}
proxy() {  # NAME [--set KEY=VALUE ...]: DeepGEMM's JIT builds counted from its cache directory
  local name=$1
  shift
  timeout "${PROXY_TIMEOUT:-300}" $cli train proxies/deepseek_v3_proxy_1gpu --compare "${PROXY_PRECISIONS:-bf16,fp8flow}" \
    --steps "${PROXY_STEPS:-8}" --set log_interval=2 "$@" ${PROXY_SET:-} --out "$out/$name" 2>&1 | quiet | tee "$out/$name.log" \
    | tail -14
  local rc=${PIPESTATUS[0]}
  echo "DeepGEMM JIT cache entries: $(find "$DG_JIT_CACHE_DIR" -name '*.cubin' 2>/dev/null | wc -l)"
  return "$rc"
}
step_host_profile() {  # where a flow layer step's host time goes (one step per profile, device synced after)
  timeout 150 python3 - <<'PY' 2>&1 | quiet | tail -40
import cProfile, pstats, io, torch
from megatron_fp8flow.benchmarks import moe_layer as ml
from megatron_fp8flow.megatron import small_model as sm
sm.init_parallel(0, 1)
shape = sm.SmallMoE(num_layers=1, hidden=7168, heads=56, ffn=4 * 7168, experts=32, topk=8, moe_ffn=2048,
                    shared_ffn=2048, groups=8, group_topk=4, mtp_layers=0)
cfg = sm.config(shape)
module, _ = ml.with_main_grads(ml._layer("flow", cfg, fused=True), cfg)
x = torch.randn(4096, 1, 7168, device="cuda", dtype=torch.bfloat16)
def step():
    out, _ = module(x.detach().requires_grad_(True)); out.backward(x)
for _ in range(3): step()
torch.cuda.synchronize()
prof = cProfile.Profile()
for _ in range(3):
    prof.enable(); step(); prof.disable(); torch.cuda.synchronize()
text = io.StringIO(); pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(28); print(text.getvalue()[:7000])
PY
}
step_proxy() { proxy proxy; }
step_proxy_profile() { proxy proxy_profile --profile-step "${PROFILE_STEP:-6}"; }
step_proxy_mbs4() { proxy proxy_mbs4 --set micro_batch_size=4; }
step_memory() {
  timeout "${MEMORY_TIMEOUT:-240}" $cli train proxies/deepseek_v3_proxy_1gpu --compare "${PROXY_PRECISIONS:-bf16,fp8flow}" \
    --steps 2 --set log_interval=1 --set micro_batch_size="${MEMORY_MBS:-2}" --memory-breakdown ${MEMORY_SET:-} \
    --out "$out/proxy_memory_mbs${MEMORY_MBS:-2}${MEMORY_TAG:-}" 2>&1 | quiet \
    | tee "$out/proxy_memory_mbs${MEMORY_MBS:-2}${MEMORY_TAG:-}.log" | tail -16
  return "${PIPESTATUS[0]}"
}
step_pretrain() {
  local data=/tmp/fp8flow_data/stdlib
  [ -f "$data.idx" ] || $cli data "$data" --corpus python-stdlib 2>&1 | quiet | tail -1
  timeout "${PRETRAIN_TIMEOUT:-420}" $cli train proxies/deepseek_v3_proxy_1gpu --megatron --compare "${PRETRAIN_PRECISIONS:-bf16,fp8flow}" \
    --steps "${PRETRAIN_ITERS:-50}" --set data_path="$data" --set log_interval=10 --set eval_interval=1000 \
    --set eval_iters=1 --set use_distributed_optimizer=true ${PRETRAIN_SET:-} > "$out/pretrain.log" 2>&1
  local rc=$?
  grep -E "iteration +[0-9]+/|Error|error:|memory \(MB\)|OutOfMemory" "$out/pretrain.log" | cut -c1-400 | tail -16
  return $rc
}
step_pretrain_memory() {  # the memory at the peak of pretrain()'s first iterations, by category (allocator history)
  local data=/tmp/fp8flow_data/stdlib
  [ -f "$data.idx" ] || $cli data "$data" --corpus python-stdlib 2>&1 | quiet | tail -1
  timeout "${PRETRAIN_TIMEOUT:-420}" $cli train proxies/deepseek_v3_proxy_1gpu --megatron --compare "${PRETRAIN_PRECISIONS:-bf16,fp8flow}" \
    --steps "${MEMORY_ITERS:-4}" --memory-breakdown --out "$out/pretrain_memory" --set data_path="$data" \
    --set log_interval=1 --set eval_interval=1000 --set eval_iters=1 --set use_distributed_optimizer=true \
    --set lr_warmup_iters=1 ${MEMORY_SET:-} > "$out/pretrain_memory.log" 2>&1
  local rc=$?
  grep -E "iteration +[0-9]+/|Error|error:|memory \(MB\)|OutOfMemory|^\|" "$out/pretrain_memory.log" | cut -c1-300 | tail -30
  return $rc
}
step_kernel_tests() {
  gpu_pytest 150 "$out/pytest_kernels.log" tests/test_fp8_kernels.py -k "weight"
}
step_tests() {
  # shellcheck disable=SC2086
  gpu_pytest "${TESTS_TIMEOUT:-400}" "$out/pytest.log" ${TEST_FILES:-tests/test_megatron.py}
}

gpu_main "layer breakdown proxy memory" "$@"
