#!/usr/bin/env bash
# The DeepGEMM engine on one Hopper GPU: its tests, the grouped-GEMM table and the expert block.
#   bash scripts/gpu_deepgemm.sh OUT_DIR [tests] [gemm] [experts] [experts-skewed]
# Needs the deep_gemm module: importable already, or a deepgemm wheel in .dgw/ (installed into
# /tmp/dg). Some toolchains link libstdc++ statically into that extension; then set
# DG_PRELOAD_LIBSTDCXX=1 to preload the system's libstdc++ (a std::regex facet mismatch
# otherwise crashes the first call).
source "$(dirname "$0")/gpu_common.sh"

setup() {
  need_deepgemm || return 1
  python3 -c "import deep_gemm, torch; print('deep_gemm', deep_gemm.__version__, torch.cuda.get_device_name())" || return 1
}

step_tests() {
  # shellcheck disable=SC2086
  gpu_pytest "${TESTS_TIMEOUT:-300}" "$out/pytest.log" ${TEST_FILES:-tests/test_gemm_deepgemm.py tests/test_gemm.py}
}

step_gemm() {
  timeout "${GEMM_TIMEOUT:-200}" python3 -c "
from megatron_fp8flow.benchmarks import grouped_gemm as b
print(b.render(b.run(out_dir='$out/grouped_gemm', backends=('deepgemm', 'cublas'))))" 2>&1 | quiet | tail -n 90
}

experts() {
  timeout "${EXPERTS_TIMEOUT:-300}" python3 -c "
from megatron_fp8flow.benchmarks import expert_block as b
print(b.render(b.run(out_dir='$out/$2', routings=('$1',), contracts=tuple('${CONTRACTS:-main_grad param}'.split()))))" \
    2>&1 | quiet | tail -n 60
}
step_experts() { experts balanced expert_block; }
step_breakdown() {
  timeout "${BREAKDOWN_TIMEOUT:-150}" python3 -c "
import json, torch
from megatron_fp8flow.benchmarks import expert_block as b
rows = [b.breakdown(m, 32, torch.device('cuda'), bf16_gemm='deepgemm') for m in ('flow', 'bf16')]
json.dump(rows, open('$out/breakdown.json', 'w'), indent=1)
for r in rows:
    print(r['mode'], r['device_ms_by_category']); print(json.dumps(r['top_kernels_ms'], indent=0))
print(rows[0]['host_profile_3_steps'][:6000])" 2>&1 | quiet | tail -n 80
}
step_experts_skewed() { experts skewed expert_block_skewed; }

gpu_main "tests gemm experts experts-skewed breakdown" "$@"
