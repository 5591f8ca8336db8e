# Shared by the scripts/gpu_*.sh runners (source it): arguments, environment and the step loop.
# A runner defines one function per step, step_<name> (dashes become underscores), returning its
# main command's status; optionally a function `setup`; then calls: gpu_main "DEFAULT STEPS" "$@"
set -uo pipefail

# Drop library warnings and blank lines from a log stream.
quiet() { grep -v -i "warn\|Unknown MLP\|DEPRECATED\|^\s*$" || true; }

# megatron-core from the wheels in .whl/ when it is not importable (GPU machines without it).
need_megatron() {
  if ! python3 -c "import megatron.core" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
}

# deep_gemm from a wheel in .dgw/ when it is not importable; DG_PRELOAD_LIBSTDCXX=1 preloads the
# system's libstdc++ where the extension was linked with a static one (its first call crashes otherwise).
need_deepgemm() {
  if ! python3 -c "import deep_gemm" 2>/dev/null && ls .dgw/deepgemm-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/dg .dgw/deepgemm-*.whl || return 1
    export PYTHONPATH="/tmp/dg:${PYTHONPATH:-}"
  fi
  if [ "${DG_PRELOAD_LIBSTDCXX:-0}" = 1 ]; then export LD_PRELOAD=/lib/x86_64-linux-gnu/libstdc++.so.6; fi
  # DeepGEMM's kernel builds kept in the checkout (ignored by git), so later runs load them
  export DG_JIT_CACHE_DIR=${DG_JIT_CACHE_DIR:-$(pwd)/.dgcache}
}

# gpu_pytest SECONDS LOG PYTEST_ARGS...: pytest, one line per test as it finishes, into LOG (and its
# last lines to the console). At the limit it gets SIGINT, not SIGKILL, so it still prints which
# tests passed, failed or never ran; returns pytest's status.
gpu_pytest() {
  local limit=$1 log=$2
  shift 2
  timeout -s INT -k 30 "$limit" python3 -m pytest -v -p no:cacheprovider -rfEs --tb=short "$@" 2>&1 | tee "$log" \
    | grep -v "PASSED\|^\s*$" | tail -n 30
  return "${PIPESTATUS[0]}"
}

# gpu_main "DEFAULT STEPS" OUTPUT_DIR [STEP ...]: runs each step, prints its status, and returns
# non-zero when any step failed. Sets $out for the steps.
gpu_main() {
  local defaults=$1
  shift
  out=${1:-gpu_results}
  shift || true
  local steps=${*:-$defaults} rc=0 step fn step_rc
  mkdir -p "$out"
  export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
  # Triton's compiled kernels kept in the checkout too (ignored by git), like DeepGEMM's builds
  export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$(pwd)/.tritoncache}
  if [ "$(type -t setup)" = function ]; then setup || return $?; fi
  for step in $steps; do
    fn="step_${step//-/_}"
    if [ "$(type -t "$fn")" = function ]; then
      "$fn"
      step_rc=$?
    else
      echo "unknown step $step" >&2
      step_rc=2
    fi
    echo "step $step rc=$step_rc"
    rc=$(( rc || step_rc ))
  done
  return $rc
}
