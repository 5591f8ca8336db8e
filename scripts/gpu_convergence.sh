#!/usr/bin/env bash
# Convergence runs of proxies/deepseek_v3_convergence on one GPU, one precision and seed each,
# one after another (runs side by side on one GPU share its time and end no sooner in all):
#   RUNS="bf16:1 fp8flow:1 bf16:2" bash scripts/gpu_convergence.sh OUT_DIR runs
# writes OUT_DIR/<precision>_seed<N>/ (compare.json) and the run's log for each. With
# RUN_BUDGET=SECONDS a run starts only while at least RUN_MIN (150) seconds are left and gets
# what is left, so a limit cuts the last run short, not all of them. Merge whatever runs there
# are, made at any time, with
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
  local start=$SECONDS limit
  for run in ${RUNS:-bf16:1 fp8flow:1}; do
    precision=${run%%:*}
    seed=${run##*:}
    limit=${RUN_TIMEOUT:-540}
    if [ -n "${RUN_BUDGET:-}" ]; then
      limit=$(( RUN_BUDGET - (SECONDS - start) ))
      if [ "$limit" -lt "${RUN_MIN:-150}" ]; then echo "$run: not started, ${limit} s of RUN_BUDGET left"; rc=1; break; fi
    fi
    timeout "$limit" $cli train proxies/deepseek_v3_convergence --compare "$precision" \
      --set seed="$seed" --set data_path="$data" ${RUN_SET:-} --out "$out/${precision}_seed$seed" \
      > "$out/${precision}_seed$seed.log" 2>&1 || rc=$?
    grep "step .*/" "$out/${precision}_seed$seed.log" | awk 'NR % 30 == 0' | cut -c1-140
  done
  return $rc
}

gpu_main "runs" "$@"
