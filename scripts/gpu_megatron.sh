#!/usr/bin/env bash
# On a machine with two CUDA GPUs: the Megatron integration tests (EP=1 and EP=2 with NCCL),
# the cast audit at EP=2 and the FP8-vs-bf16 dispatch benchmark. megatron-core is installed
# from wheels in .whl/ when it is not importable.
# Usage: scripts/gpu_megatron.sh OUTPUT_DIR [STEP ...]
#   STEP: tests | audit | dispatch | layer1 | layer2   (default: tests audit dispatch layer1 layer2)
set -uo pipefail
out=${1:-gpu_results}
shift || true
steps=${*:-tests audit dispatch layer1 layer2}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
if ! python3 -c "import megatron.core" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c "import megatron.core, torch; print('megatron-core', megatron.core.__version__, 'torch', torch.__version__, 'gpus', torch.cuda.device_count())" | tee "$out/env.txt"
rc=0
for step in $steps; do
  case $step in
    tests) timeout 420 python3 -m pytest tests/test_megatron.py -q -p no:cacheprovider -rs 2>&1 | tee "$out/pytest_megatron.log" | tail -15 ;;
    audit) timeout 200 python3 -m megatron_fp8flow.cli audit --ep 2 --json "$out/audit.json" 2>&1 | grep -v Warning | tee "$out/audit.log" | tail -12 ;;
    dispatch) timeout 200 torchrun --nproc_per_node 2 -m megatron_fp8flow.benchmarks.dispatch "$out" 2>&1 | tee "$out/dispatch.log" | tail -8 ;;
    layer1) timeout 300 torchrun --nproc_per_node 1 -m megatron_fp8flow.benchmarks.moe_layer "$out" 2>&1 | tee "$out/moe_layer1.log" | tail -9 ;;
    layer2) timeout 300 torchrun --nproc_per_node 2 -m megatron_fp8flow.benchmarks.moe_layer "$out" 2>&1 | tee "$out/moe_layer2.log" | tail -9 ;;
    *) echo "unknown step $step" >&2; rc=2; continue ;;
  esac
  step_rc=${PIPESTATUS[0]}
  echo "step $step rc=$step_rc"
  rc=$(( rc || step_rc ))
done
exit $rc
