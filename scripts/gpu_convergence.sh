#!/usr/bin/env bash
# Convergence runs of proxies/deepseek_v3_convergence on one GPU, one precision and seed each:
#   RUNS="bf16:1 fp8flow:1 bf16:2" bash scripts/gpu_convergence.sh OUT_DIR runs
# writes OUT_DIR/<precision>_seed<N>/ (compare.json, the run's log) for each; merge whatever is
# there, made at any time, with
#   fp8flow compare docs/results/convergence/*_seed*/ --out DIR --verdict docs/results/convergence/verdict.json
# The corpus (python-torch) is written on the machine first; its fingerprint is printed so runs
# made on other machines can be checked to have seen the same text.
source "$(dirname "$0")/gpu_common.sh"
cli="python3 -m megatron_fp8flow.cli"

setup() {
  need_megatron
  need_deepgemm || return 1
  data=${DATA:-/tmp/fp8flow_data/torch}
  [ -f "$data.idx" ] || $cli data "$data" --corpus python-torch 2>&1 | quiet | tail -1 | tee "$out/data.txt"
}
step_runs() {
  local run precision seed rc=0
  for run in ${RUNS:-bf16:1 fp8flow:1}; do
    precision=${run%%:*}
    seed=${run##*:}
    timeout "${RUN_TIMEOUT:-540}" $cli train proxies/deepseek_v3_convergence --compare "$precision" \
      --set seed="$seed" --set data_path="$data" ${RUN_SET:-} --out "$out/${precision}_seed$seed" \
      > "$out/${precision}_seed$seed.log" 2>&1 || rc=$?
    grep "step .*/" "$out/${precision}_seed$seed.log" | awk 'NR % 30 == 0' | cut -c1-140
  done
  return $rc
}

gpu_main "runs" "$@"
