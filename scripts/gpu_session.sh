#!/usr/bin/env bash
# The GPU checks of the kernel and throughput work (GPU-marked tests, the four benchmarks), split into stages
# that each fit one call of a lent GPU machine (10 minutes a call; the machine has torch, triton, transformers
# and peft but no deepspeed and no package index). README "GPU session" has the walk-through.
#
# Here (pip reaches the package index), once per checkout; ~19 MB, .whl/ is git-ignored:
#   bash scripts/gpu_session.sh wheels            # scripts/gpu_wheels.py build: the closed set the image lacks
# There, one stage per call, carrying .whl (device tool: run, carry [".whl"]):
#   bash scripts/gpu_session.sh kernels            # pytest -m gpu tests/kernels, then bench_lora_kernel.py
#   bash scripts/gpu_session.sh infer              # bench_inference_cost.py (t5-xl t5-xxl llama-7b)
#   bash scripts/gpu_session.sh plan               # bench_plan_memory.py (planner vs measured peak)
#   bash scripts/gpu_session.sh train t5-xl        # bench_train_step.py --recipe t5-xl (then t5-xxl, llama-7b)
# Arguments after the stage (after the recipe for train) go to its benchmark, e.g.
#   bash scripts/gpu_session.sh train t5-xxl --engines z3 --no_checkpointing_table
# Each stage prints the versions it runs with, writes its results to benchmarks/results/ (train-step
# files are tagged with the recipe) and copies them with its log to $OUT, which the device tool brings
# back; commit them from here. Each command is bounded by STAGE_TIMEOUT seconds (default 540).
# SMOKE=1 passes --smoke to every benchmark, BENCH_OUT=DIR moves the results and WHEELS=DIR the wheels (the
# CPU check in the tests runs with an empty one: the wheels are for CPython 3.12).
set -uo pipefail
cd "$(dirname "$0")/.."

STAGE=${1:-}
[[ $# -gt 0 ]] && shift
OUT=${OUT:-${TMPDIR:-/tmp}/tagi_gpu_out}
BENCH_OUT=${BENCH_OUT:-benchmarks/results}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-540}
WHEELS=${WHEELS:-.whl}            # the carried wheels (wheels stage: where they go)
SMOKE_FLAG=()
[[ "${SMOKE:-0}" == 1 ]] && SMOKE_FLAG=(--smoke)
PY=${PYTHON:-python3}

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

# The wheels the GPU image lacks, as a closed set (scripts/gpu_wheels.py: needs from setup.py, the image's own
# packages where they satisfy it, the rest at requirements/tested.txt's versions, built or downloaded for CPython
# 3.12 x86-64, then a closure check: every requirement of a carried wheel is carried or on the image).
wheels() {
  python scripts/gpu_wheels.py build --wheels "$WHEELS" || exit 2
  du -sh "$WHEELS"
}

setup() {
  mkdir -p "$OUT" "$BENCH_OUT"
  local site=${TMPDIR:-/tmp}/tagi_gpu_site
  rm -rf "$site"
  mkdir -p "$site"
  if compgen -G "$WHEELS/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl \
      || { echo "error: installing $WHEELS/*.whl failed (they are built for CPython 3.12 x86-64)"; exit 2; }
  fi
  ln -sfn "$PWD/kernels/tagi_kernels" "$site/tagi_kernels"  # what `pip install -e .` maps kernels/ to
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  unset TRITON_INTERPRET
  $PY - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import platform, torch, triton, transformers
print("python", platform.python_version(), "| torch", torch.__version__, "| triton", triton.__version__,
      "| transformers", transformers.__version__)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device (CPU)")
try:
    import deepspeed
    print("deepspeed", deepspeed.__version__)
except Exception as err:  # the train-step benchmark then runs its torch engine only and says why
    print("deepspeed unavailable:", type(err).__name__, err)
import tagi_ds, tagi_kernels  # noqa: F401
EOF
  [[ ${PIPESTATUS[0]} == 0 ]] || { echo "error: the environment check failed"; exit 2; }
  MARK=$(mktemp)
  FAILED=0
}

# step NAME CMD...: one bounded command, its output in $OUT/NAME.log
step() {
  local name=$1; shift
  echo "== $name: $*"
  timeout "$STAGE_TIMEOUT" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [[ $rc == 0 ]] || { echo "== $name failed (exit $rc; 124 = over ${STAGE_TIMEOUT}s)"; FAILED=1; }
}

collect() {
  find "$BENCH_OUT" -maxdepth 1 -type f -newer "$MARK" \( -name '*.json' -o -name '*.md' \) -exec cp {} "$OUT/" \;
  rm -f "$MARK"
  echo "== results in $OUT:"
  ls -l "$OUT"
  exit "$FAILED"
}

case "$STAGE" in
  wheels)
    wheels ;;
  kernels)
    setup
    step gpu_tests $PY -m pytest -q -p no:cacheprovider tests/kernels -m gpu
    step bench_lora_kernel $PY benchmarks/bench_lora_kernel.py --out_dir "$BENCH_OUT" "${SMOKE_FLAG[@]}" "$@"
    collect ;;
  infer)
    setup
    step bench_inference_cost $PY benchmarks/bench_inference_cost.py --out_dir "$BENCH_OUT" "${SMOKE_FLAG[@]}" "$@"
    collect ;;
  plan)
    setup
    step bench_plan_memory $PY benchmarks/bench_plan_memory.py --out_dir "$BENCH_OUT" "${SMOKE_FLAG[@]}" "$@"
    collect ;;
  train)
    recipe=${1:-}
    [[ -n "$recipe" && "$recipe" != -* ]] || { echo "error: train needs a recipe (t5-xl, t5-xxl, llama-7b, ...)"; exit 2; }
    shift
    setup
    step "bench_train_step_$recipe" $PY benchmarks/bench_train_step.py --recipe "$recipe" --tag "$recipe" \
      --out_dir "$BENCH_OUT" "${SMOKE_FLAG[@]}" "$@"
    collect ;;
  -h|--help|help)
    usage ;;
  *)
    echo "error: unknown stage '${STAGE}' (wheels, kernels, infer, plan, train RECIPE)"
    exit 2 ;;
esac
