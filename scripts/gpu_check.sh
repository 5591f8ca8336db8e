#!/usr/bin/env bash
# On a CUDA machine: the whole test suite natively, then the SAT/quantize, MoE-operator and
# expert-block benchmarks.
# Usage: scripts/gpu_check.sh [OUTPUT_DIR]   (logs and JSON results go to OUTPUT_DIR)
set -uo pipefail
out=${1:-gpu_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
python3 -m pytest tests -q -p no:cacheprovider -rs 2>&1 | tee "$out/pytest.log" | tail -25
test_rc=${PIPESTATUS[0]}
python3 -m megatron_fp8flow.cli bench sat --out "$out" "${@:2}" 2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}
python3 -m megatron_fp8flow.cli bench moe --out "$out" 2>&1 | tee "$out/bench_moe.log"
bench_rc=$(( bench_rc || PIPESTATUS[0] ))
python3 -m megatron_fp8flow.cli bench experts --out "$out" 2>&1 | tee "$out/bench_experts.log"
bench_rc=$(( bench_rc || PIPESTATUS[0] ))
echo "pytest rc=$test_rc bench rc=$bench_rc"
exit $(( test_rc || bench_rc ))
