#!/usr/bin/env bash
# The GPU work, split into stages that each fit one call of a lent GPU machine (about 8 minutes of work a call;
# the machine has torch, triton, transformers and peft but no deepspeed and no package index; ../shared/GPU.md).
# README "GPU session" has the walk-through.
#
# Here (pip reaches the package index), once per checkout; ~12 MB, .whl/ is git-ignored:
#   bash scripts/gpu_session.sh wheels     # scripts/gpu_wheels.py build: the closed set of wheels the image lacks
# There, ONE stage per call, carrying .whl (device tool: run, carry [".whl"]):
#   bash scripts/gpu_session.sh check      # GPU kernel tests (small autotune space), one LoRA + TAGI step at t5-xl
#                                          # and llama-7b shapes (each case its own process), then the whole pipeline
#                                          # on 1 GPU (z3, bf16, Triton op; scripts/gpu_pipeline.py). Time plan below.
#   bash scripts/gpu_session.sh profile    # ONE recipe a call: RECIPES=t5-xl (default) or RECIPES=llama-7b;
#                                          # profile_train_step.py (lora; z3 z3+partitioned torch), then
#                                          # bench_train_step.py (lora, tagi on z3; tagi on torch). Time plan below.
#   bash scripts/gpu_session.sh kernels    # GPU kernel tests, then bench_lora_kernel.py over the full grid
#   bash scripts/gpu_session.sh infer      # bench_inference_cost.py (t5-xl t5-xxl llama-7b)
#   bash scripts/gpu_session.sh plan       # bench_plan_memory.py (planner vs measured peak)
#   bash scripts/gpu_session.sh train t5-xl [bench flags]   # bench_train_step.py --recipe t5-xl --tag t5-xl
#
# check's time plan, sized for one H100 80 GB and one device `run` call (<= 600 s of command; BUDGET 540 leaves
# 60 s of slack). Ordered by diagnostic value: a fault in a Triton kernel is a sticky CUDA error that fails whatever
# runs after it in the same process, so the kernels go first and every train case runs in its own process.
#   setup                 ~20 s  wheels into a site dir, versions, nvidia-smi (not a step: counted from the start)
#   gpu_kernel_tests       60 s  pytest -m gpu tests/kernels, one autotune config per kernel (~1 min expected)
#   train_step_t5-xl      140 s  the parent ~10 s (imports, DeepSpeed check), then lora 55 s (process start ~15 s,
#                                3B build ~20 s, 4 steps of ~2.2 s), then tagi 75 s (the same + the teacher bank
#                                + 4 steps of ~5 s); each case under its own cap (--case_timeout)
#   train_step_llama-7b   180 s  parent ~10 s, lora 75 s (7B build ~40 s, 4 steps of ~1 s), tagi 95 s (+ bank,
#                                4 steps of ~2.5 s)
#   pipeline              160 s  8 launches of the tiny recipe (~15 s each: imports, DeepSpeed init, 6 steps; two
#                                at a time where independent), 60 s per launch; last, it gets what is left: ~140 s
#   sum of caps           540 s  = BUDGET (setup comes out of the pipeline's share: it runs last)
#
# profile's time plan, per call (one recipe), sized for one H100 80 GB and one device `run` call: BUDGET 540, 60 s
# of slack. Every case is its own process (DeepSpeed keeps ZeRO-3 engines alive; ~27 GiB left behind per t5-xl
# case), so every case pays the process start (~15 s) and the model build (3B ~20 s, 7B ~40 s; `build s` in the
# result tables: the next plan comes from those numbers). The profiler's post-processing (summary s) parses every
# event into Python: ~15-30 s per profiled case at t5-xl's 24+24 layers (~27 s for 169k events on this 2-core host,
# loaded). Two recipes x four engines no longer fit one call: one recipe a call, z2 left out (not a product path).
#                        t5-xl  llama-7b
#   setup                 ~20 s   ~20 s  as check's (not a step: comes out of bench_train_step's share, it runs last)
#   profile_train_step    270 s   250 s  parent ~10 s, then z3 (the product path: backbone where the planner puts
#                                        it), z3+partitioned (the 2026-12-04 path, the "before"), torch (the
#                                        reference), each <= 85 s (7B: 80): start 15 + build 20 (7B 40) + 4 steps
#                                        + 2 profiled + summary 15-30 (7B: 32 decoder layers, fewer events) + 1 step
#   bench_train_step      270 s   290 s  parent ~10 s, lora z3 <= 70 s (7B 75), tagi z3 and tagi torch <= 85 s
#                                        each (7B 95: the bank ~20 s, 4 steps of ~2.5 s); 3 timed steps after 2
#                                        warm-up; what setup leaves it: 250 s (7B 270) = the sum of its cases + 10
#   sum of caps           540 s   540 s  = BUDGET
# RECIPES other than t5-xl or llama-7b (one of them) are refused in one line; SMOKE runs tiny (t5-xl) or
# tiny-llama (llama-7b) on the same engines and cases.
# Every step runs under its own timeout, capped by what is left of the stage's BUDGET (seconds; check and profile
# 540, others 480);
# a step that no longer fits is skipped and says so. After every step the stage's logs and results are packed
# into $OUT/<stage>.tgz, so a call cut short still brings back what came before. $OUT ends up holding at most
# 8 files: <stage>.tgz, summary.txt, versions.txt and the new result files (*.md, *.json; commit them under
# benchmarks/results/). A summary table is printed last. Exit 0 only if every step passed.
# SMOKE=1: the CPU check the tests run (tiny shapes, --smoke benchmarks, GPU-only tests skipped); every cap and the
# default budget times SMOKE_SCALE (default 3: a loaded 2-core host is several times slower than idle).
# OUT=DIR, BENCH_OUT=DIR (default benchmarks/results), WHEELS=DIR (default .whl), BUDGET=SECONDS, PYTHON=python3.
set -uo pipefail
cd "$(dirname "$0")/.."

STAGE=${1:-}
[[ $# -gt 0 ]] && shift
OUT=${OUT:-${TMPDIR:-/tmp}/tagi_gpu_out}
BENCH_OUT=${BENCH_OUT:-benchmarks/results}
DEFAULT_BUDGET=480
[[ "$STAGE" == check ]] && DEFAULT_BUDGET=540
[[ "$STAGE" == profile ]] && DEFAULT_BUDGET=540  # its own plan in the header, like check's
# SMOKE runs on a shared CPU host: every cap (and the default budget) times SMOKE_SCALE, so load is not a failure.
SMOKE=${SMOKE:-0}
SCALE=1
[[ "$SMOKE" == 1 ]] && SCALE=${SMOKE_SCALE:-3}
BUDGET=${BUDGET:-$(( DEFAULT_BUDGET * SCALE ))}
WHEELS=${WHEELS:-.whl}
SMOKE_FLAG=()
[[ "$SMOKE" == 1 ]] && SMOKE_FLAG=(--smoke)
PY=${PYTHON:-python3}
T0=$(date +%s)

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

wheels() {
  $PY scripts/gpu_wheels.py build --wheels "$WHEELS" || exit 2
  du -sh "$WHEELS"
}

# Carried wheels first on PYTHONPATH (the image's own packages where the closure kept them), the repository
# after them; an environment check; then the work dir whose contents travel back packed.
setup() {
  mkdir -p "$OUT" "$BENCH_OUT"
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/tagi_gpu_work.XXXXXX")
  SUMMARY="$WORK/summary.txt"
  printf '%-24s %-8s %7s  %s\n' step status seconds detail > "$SUMMARY"
  MARK="$WORK/.mark"
  touch "$MARK"
  FAILED=0
  local site=$WORK/site
  mkdir -p "$site"
  if compgen -G "$WHEELS/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl \
      || { echo "error: installing $WHEELS/*.whl failed (they are built for CPython 3.12 x86-64)"; exit 2; }
  fi
  ln -sfn "$PWD/kernels/tagi_kernels" "$site/tagi_kernels"  # what `pip install -e .` maps kernels/tagi_kernels to
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  unset TRITON_INTERPRET
  $PY - <<'EOF' 2>&1 | tee "$WORK/versions.txt"
import platform, torch, triton, transformers
print("python", platform.python_version(), "| torch", torch.__version__, "| triton", triton.__version__,
      "| transformers", transformers.__version__)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device (CPU)")
for name in ("deepspeed", "peft"):
    try:
        print(name, __import__(name).__version__)
    except Exception as err:  # the train-step benchmark then runs its torch engine only and says why
        print(name, "unavailable:", type(err).__name__, err)
import tagi_ds, tagi_kernels  # noqa: F401
EOF
  local env_rc=${PIPESTATUS[0]}
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,power.draw \
    --format=csv >> "$WORK/versions.txt" 2>&1
  cp "$WORK/versions.txt" "$OUT/"  # after the nvidia-smi line: the copy that comes back holds it
  [[ $env_rc == 0 ]] || { echo "error: the environment check failed"; exit 2; }
}

pack() {
  find "$BENCH_OUT" -maxdepth 1 -type f -newer "$MARK" \( -name '*.json' -o -name '*.md' \) -exec cp {} "$WORK/" \;
  tar -czf "$OUT/$STAGE.tgz" -C "$WORK" --exclude=./site . 2>/dev/null
  cp "$SUMMARY" "$OUT/summary.txt"
}

# step NAME MAXSECONDS CMD...: one bounded command, its output in NAME.log (the last lines echoed).
step() {
  local name=$1 max=$(( $2 * SCALE )); shift 2
  local l; l=$(left)
  if (( l < 30 )); then
    echo "== $name skipped: ${l}s of the ${BUDGET}s budget left"
    printf '%-24s %-8s %7s  %s\n' "$name" skipped 0 "budget" >> "$SUMMARY"
    FAILED=1; pack; return
  fi
  (( max > l - 10 )) && max=$(( l - 10 ))
  echo "== $name (<= ${max}s): $*"
  local t; t=$(date +%s)
  timeout "$max" "$@" > "$WORK/$name.log" 2>&1
  local rc=$? secs=$(( $(date +%s) - t )) status=ok
  [[ $rc == 0 ]] || { status="exit $rc"; FAILED=1; }
  [[ $rc == 124 ]] && status="timeout"
  tail -n "${TAILN:-5}" "$WORK/$name.log"
  printf '%-24s %-8s %7s  %s\n' "$name" "$status" "$secs" "$(grep -v '^\s*$' "$WORK/$name.log" | tail -n 1 | cut -c1-70)" \
    >> "$SUMMARY"
  pack
}

finish() {
  pack
  find "$WORK" -maxdepth 1 -type f \( -name '*.md' -o -name '*.json' \) -newer "$MARK" -exec cp {} "$OUT/" \;
  echo "== files in $OUT:"
  ls "$OUT"
  [[ -f "$WORK/pipeline/pipeline.tsv" ]] && { echo "== pipeline"; column -t -s $'\t' "$WORK/pipeline/pipeline.tsv"; }
  for f in "$WORK"/*train_step*.md; do
    [[ -f "$f" ]] && { echo "== $(basename "$f")"; grep '^|' "$f" | cut -c1-160; }
  done
  echo "== summary ($(( $(date +%s) - T0 ))s of ${BUDGET}s)"
  cat "$SUMMARY"
  exit "$FAILED"
}

# The GPU-marked kernel tests with one fixed config per kernel (TAGI_KERNELS_TUNE=fixed): every specialization
# compiles once instead of once per autotune config.
kernel_tests() {
  step gpu_kernel_tests "$1" env TAGI_KERNELS_TUNE=fixed $PY -m pytest -q -p no:cacheprovider tests/kernels -m gpu
}

# The LoRA step, then the TAGI step, at a recipe's full shapes (B=4, K=2, input 1024, target 128, instruction 1024:
# the benchmark's GPU defaults), ZeRO-3: each case in its own process under its own cap (--case_timeout), so an OOM
# or a sticky CUDA error in one still leaves the other. One result file pair per recipe (what comes back: <= 8 files).
# SMOKE: the tiny recipes at the tiniest shapes, 1 step: the wiring, not the numbers.
train_step() {
  local recipe=$1 max=$2 lora=$3 tagi=$4
  local shapes=(--recipe "$recipe" --steps 3 --warmup 1) variants=(lora tagi)
  # SMOKE runs the tagi case alone (the step that crashed on the GPU on 2026-12-04): the lora baseline and the
  # ratios of this same script and engine are checked on the profile stage's SMOKE run (issue 29: 2 processes).
  [[ "$SMOKE" == 1 ]] && shapes=(--recipe "$([[ $recipe == llama* ]] && echo tiny-llama || echo tiny)" --smoke \
    --micro_batch 2 --seq_len 8 --target_len 4 --instr_len 8 --teacher_rows 2 --steps 1 --warmup 1) variants=(tagi)
  step "train_step_$recipe" "$max" $PY benchmarks/bench_train_step.py "${shapes[@]}" --tag "$recipe" \
    --variants "${variants[@]}" --engines z3 --no_checkpointing_table --case_timeout "lora=$(( lora * SCALE ))" \
    "tagi=$(( tagi * SCALE ))" \
    --out_dir "$BENCH_OUT"
}

case "$STAGE" in
  wheels)
    wheels ;;
  check)
    # The time plan is in this file's header; the caps sum to BUDGET (540).
    setup
    kernel_tests 60
    train_step t5-xl 140 55 75     # step cap, then the lora and tagi cases' caps
    train_step llama-7b 180 75 95
    pipe=(--steps 6 --eval_n 5)
    [[ "$SMOKE" == 1 ]] && pipe=(--steps 1 --eval_n 1 --eval_set data.categories=Spelling)
    step pipeline 160 $PY scripts/gpu_pipeline.py --out "$WORK/pipeline" --timeout $(( 60 * SCALE )) "${pipe[@]}"
    finish ;;
  profile)
    # Issues 15 and 27: where a training step's time goes, then the steps themselves, at one recipe's full shapes
    # (B=4, K=2, input 1024, target 128, instruction 1024: the benchmarks' GPU defaults). Engines: z3 (the frozen
    # backbone where train.frozen_backbone=auto puts it), z3+partitioned (ZeRO-3 owns the backbone: the path
    # measured on 2026-12-04, the "before") and torch (no DeepSpeed). One file pair per script, tagged with the
    # recipe, rewritten after every finished case: a step cut by its cap keeps what it measured. Caps: the header.
    RECIPES=${RECIPES:-t5-xl}
    case "$RECIPES" in
      # the header's plan: profile step cap, its per-engine case cap, bench step cap, lora and tagi case caps
      t5-xl) tiny=tiny; caps=(270 85 270 70 85) ;;
      llama-7b) tiny=tiny-llama; caps=(250 80 290 75 95) ;;
      *) echo "error: RECIPES='$RECIPES' is not a profile recipe: t5-xl or llama-7b, one per call"; exit 2 ;;
    esac
    setup
    recipe=(--recipe "$RECIPES")
    psteps=(--steps 2 --warmup 2)
    bsteps=(--steps 3 --warmup 2)
    if [[ "$SMOKE" == 1 ]]; then  # --smoke: tiny shapes, one step after one warm-up
      recipe=(--recipe "$tiny" --smoke)
      psteps=()
      bsteps=()
    fi
    TAILN=4 step profile_train_step "${caps[0]}" $PY benchmarks/profile_train_step.py "${recipe[@]}" --variant lora \
      --engines z3 z3+partitioned torch "${psteps[@]}" --case_timeout $(( caps[1] * SCALE )) --tag "$RECIPES" \
      --out_dir "$BENCH_OUT"
    TAILN=4 step bench_train_step "${caps[2]}" $PY benchmarks/bench_train_step.py "${recipe[@]}" --variants lora \
      tagi --engines z3 torch --no_checkpointing_table "${bsteps[@]}" --case_timeout "lora=$(( caps[3] * SCALE ))" \
      "tagi=$(( caps[4] * SCALE ))" --tag "$RECIPES" --out_dir "$BENCH_OUT"
    finish ;;
  kernels)
    # Issue 26, in one device call (<= 600 s of command): the GPU kernel tests (fixed tuning: one config per
    # specialization), then the issue's grid (d 2048 4096 8192, r 8 16 64, tasks 1 4 16 64, T=8192, bf16) with the
    # full autotune space reset per point, base / loop / torch / lora_linear / fused / fused_split side by side
    # (triton and triton_add left out: lora_linear dominates them by construction, kernels/NOTES.md). Caps:
    # 100 + 190 + 150 = 440 s, 40 s of slack under the default 480 s budget. d=8192 first (the largest and most
    # informative), each d-group its own file pair, and every file rewritten after each point: a step cut by its
    # cap keeps what it measured. Extra arguments replace the grid (one benchmark step with them).
    setup
    kernel_tests 100
    cases=(--cases base loop torch triton_linear fused fused_split)
    if [[ "$SMOKE" == 1 || $# -gt 0 ]]; then
      step bench_lora_kernel 330 $PY benchmarks/bench_lora_kernel.py --out_dir "$BENCH_OUT" "${cases[@]}" \
        "${SMOKE_FLAG[@]}" "$@"
    else
      step bench_lora_kernel_d8192 190 $PY benchmarks/bench_lora_kernel.py --d 8192 --tag d8192 "${cases[@]}" \
        --out_dir "$BENCH_OUT"
      step bench_lora_kernel_d2048_4096 150 $PY benchmarks/bench_lora_kernel.py --d 2048 4096 --tag d2048-4096 \
        "${cases[@]}" --out_dir "$BENCH_OUT"
    fi
    finish ;;
  infer)
    setup
    step bench_inference_cost 450 $PY benchmarks/bench_inference_cost.py --out_dir "$BENCH_OUT" "${SMOKE_FLAG[@]}" "$@"
    finish ;;
  plan)
    setup
    step bench_plan_memory 450 $PY benchmarks/bench_plan_memory.py --out_dir "$BENCH_OUT" "${SMOKE_FLAG[@]}" "$@"
    finish ;;
  train)
    recipe=${1:-}
    [[ -n "$recipe" && "$recipe" != -* ]] || { echo "error: train needs a recipe (t5-xl, t5-xxl, llama-7b, ...)"; exit 2; }
    shift
    setup
    step "bench_train_step_$recipe" 450 $PY benchmarks/bench_train_step.py --recipe "$recipe" --tag "$recipe" \
      --out_dir "$BENCH_OUT" "${SMOKE_FLAG[@]}" "$@"
    finish ;;
  -h|--help|help)
    usage ;;
  *)
    echo "error: unknown stage '${STAGE}' (wheels, check, profile, kernels, infer, plan, train RECIPE)"
    exit 2 ;;
esac
