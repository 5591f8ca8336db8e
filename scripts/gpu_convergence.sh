#!/usr/bin/env bash
# Convergence runs of proxies/deepseek_v3_convergence on one GPU, one precision and seed each:
#   RUNS="bf16:1 fp8flow:1 bf16:2" bash scripts/gpu_convergence.sh OUT_DIR runs
# or side by side on the one GPU, keeping those that finish by RUN_DEADLINE seconds (RUNS in
# priority order; see scripts/run_concurrently.py):
#   RUNS="bf16:1 fp8flow:1 bf16:2 fp8flow:2" RUN_DEADLINE=500 bash scripts/gpu_convergence.sh OUT_DIR parallel
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
step_parallel() {
  local run precision seed specs=()
  for run in ${RUNS:-bf16:1 fp8flow:1}; do
    precision=${run%%:*}
    seed=${run##*:}
    specs+=("${precision}_seed$seed=$cli train proxies/deepseek_v3_convergence --compare $precision --set seed=$seed --set data_path=$data ${RUN_SET:-} --out $out/${precision}_seed$seed")
  done
  # one CPU thread pool each, so side-by-side runs do not oversubscribe the host
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True} \
    python3 scripts/run_concurrently.py --deadline "${RUN_DEADLINE:-500}" --log-dir "$out" "${specs[@]}"
  local rc=$?
  for run in ${RUNS:-bf16:1 fp8flow:1}; do
    grep "step .*/" "$out/${run%%:*}_seed${run##*:}.log" | tail -1 | cut -c1-160
  done
  return $rc
}

gpu_main "runs" "$@"
