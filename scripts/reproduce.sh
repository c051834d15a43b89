#!/usr/bin/env bash
# The miniature TAGI reproduction on the built-in suite (docs/results.md). CPU, ~45 min on 2 cores.
#
#   bash scripts/reproduce.sh                 # full run -> runs/reproduce/, docs/results.md, docs/results.png
#   OUT=runs/quick SCALE=0.2 EVAL_N=10 bash scripts/reproduce.sh   # a smoke of the whole pipeline
#
# 0. backbone: a small T5 LM-pretrained on the built-in corpus (training tasks + generated text only)
# 1. teachers: one LoRA per training task (76), on instruction + input
# 2. hypernetwork pretraining on the built-in corpus (a | b | c)
# 3. finetuning: TAGI (CE + KL + param-MSE, fusion) and its ablations; the concat and no-instruction
#    baselines (one shared LoRA each, same backbone and step budget)
# 4. evaluation on the 29 held-out tasks (greedy, ROUGE-L / EM, counted FLOPs); teachers on training tasks
# 5. docs/results.md + docs/results.png (scripts/make_report.py)
# Jobs run two at a time, one thread each (2 cores; one thread per process avoids OpenMP oversubscription).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/reproduce}
SCALE=${SCALE:-1}                 # multiplies every step count (smoke runs)
EVAL_N=${EVAL_N:-50}              # held-out instances per task (the suite has 50)
JOBS=${JOBS:-2}
DOCS=${DOCS:-docs}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false

steps() { python -c "import sys; print(max(2, int(round($1 * $SCALE))))"; }
BB_STEPS=$(steps "${BB_STEPS:-1200}")
TEACHER_STEPS=$(steps "${TEACHER_STEPS:-600}")
PRETRAIN_STEPS=$(steps "${PRETRAIN_STEPS:-400}")
FT_STEPS=$(steps "${FT_STEPS:-1000}")
MAX_NEW=${MAX_NEW:-28}

mkdir -p "$OUT/logs"
exec > >(tee -a "$OUT/reproduce.log") 2>&1
: > "$OUT/commands.txt"
START=$(date +%s)
BB="$OUT/backbone"
# Every tagi-ds stage: the mini recipe on the pretrained backbone, one process, ZeRO-2 (nothing to shard).
COMMON=(--recipe mini --data builtin --deepspeed ds_configs/z2.json --model_name_or_path "$BB" --seed 0)
TEACHER_SET=(${TEACHER_SET:-train.lr=3e-3 teacher.granularity=category})
PRETRAIN_SET=(${PRETRAIN_SET:-train.lr=1e-3})
FT_SET=(${FT_SET:-train.lr=1e-3})
BASE_SET=(${BASE_SET:-train.lr=3e-3})

log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }
# run NAME CMD...: one job, its output in $OUT/logs/NAME.log, skipped when $OUT/NAME.done exists (resume).
run() {
  local name=$1; shift
  if [[ -f "$OUT/$name.done" ]]; then log "skip $name (done)"; return 0; fi
  log "start $name"
  echo "$*" >> "$OUT/commands.txt"
  local t0; t0=$(date +%s)
  if "$@" > "$OUT/logs/$name.log" 2>&1; then
    echo $(( $(date +%s) - t0 )) > "$OUT/$name.done"; log "done  $name ($(( $(date +%s) - t0 ))s)"
  else
    log "FAILED $name (see $OUT/logs/$name.log)"; tail -20 "$OUT/logs/$name.log"; return 1
  fi
}
# pool: run the queued "name|command" lines JOBS at a time; fail if any failed.
pool() {
  local fail=0 pids=()
  for job in "$@"; do
    while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || fail=1; done
    eval "run ${job}" &
  done
  while (( $(jobs -rp | wc -l) > 0 )); do wait -n || fail=1; done
  return $fail
}

log "reproduce: OUT=$OUT SCALE=$SCALE backbone $BB_STEPS, teachers $TEACHER_STEPS, pretrain $PRETRAIN_STEPS, finetune $FT_STEPS steps"

# 0. backbone
run backbone python scripts/pretrain_backbone.py --out "$BB" --recipe mini --steps "$BB_STEPS" --seed 0

# 1 + 2. teachers and hypernetwork pretraining (independent)
pool "teachers python launchers/train_teachers.py ${COMMON[*]} --output_dir $OUT/teachers --max_steps $TEACHER_STEPS --set ${TEACHER_SET[*]}" \
     "pretrain python launchers/pretrain.py ${COMMON[*]} --output_dir $OUT/pretrain --max_steps $PRETRAIN_STEPS --set ${PRETRAIN_SET[*]}"

# 3. finetuning: TAGI, ablations, baselines (same backbone, steps and batch)
FT=(python launchers/finetune.py ${COMMON[*]} --max_steps "$FT_STEPS")
T="--teachers $OUT/teachers/teachers"
P="--init_hypernet $OUT/pretrain/hypernet"
pool "ft_tagi ${FT[*]} $T $P --output_dir $OUT/ft_tagi --set ${FT_SET[*]}" \
     "ft_concat ${FT[*]} --mode concat --output_dir $OUT/ft_concat --set ${BASE_SET[*]}" \
     "ft_no_pretrain ${FT[*]} $T --output_dir $OUT/ft_no_pretrain --set ${FT_SET[*]}" \
     "ft_no_kl ${FT[*]} $T $P --output_dir $OUT/ft_no_kl --set ${FT_SET[*]} loss.kl_weight=0" \
     "ft_no_param ${FT[*]} $T $P --output_dir $OUT/ft_no_param --set ${FT_SET[*]} loss.param_weight=0" \
     "ft_no_fusion ${FT[*]} $T $P --output_dir $OUT/ft_no_fusion --set ${FT_SET[*]} hypernet.fusion=false" \
     "ft_no_instruction ${FT[*]} --mode no_instruction --output_dir $OUT/ft_no_instruction --set ${BASE_SET[*]}"

# 4. evaluation: held-out tasks; teachers (and TAGI / concat for reference) on the training tasks
EV=(python launchers/evaluate.py --deepspeed ds_configs/z2.json --max_new_tokens "$MAX_NEW" --batch_size 32)
HELD=(--set data.max_instances_per_task="$EVAL_N")
SEEN=(--split train --set data.max_instances_per_task=${SEEN_N:-10})
pool "ev_tagi ${EV[*]} --hypernet $OUT/ft_tagi/hypernet --output_dir $OUT/eval/tagi ${HELD[*]}" \
     "ev_concat ${EV[*]} --adapter $OUT/ft_concat/baseline_lora --output_dir $OUT/eval/concat ${HELD[*]}" \
     "ev_no_instruction ${EV[*]} --adapter $OUT/ft_no_instruction/baseline_lora --output_dir $OUT/eval/no_instruction ${HELD[*]}" \
     "ev_no_pretrain ${EV[*]} --hypernet $OUT/ft_no_pretrain/hypernet --output_dir $OUT/eval/no_pretrain ${HELD[*]}" \
     "ev_no_kl ${EV[*]} --hypernet $OUT/ft_no_kl/hypernet --output_dir $OUT/eval/no_kl ${HELD[*]}" \
     "ev_no_param ${EV[*]} --hypernet $OUT/ft_no_param/hypernet --output_dir $OUT/eval/no_param ${HELD[*]}" \
     "ev_no_fusion ${EV[*]} --hypernet $OUT/ft_no_fusion/hypernet --output_dir $OUT/eval/no_fusion ${HELD[*]}" \
     "ev_seen_teachers ${EV[*]} --teachers $OUT/teachers/teachers --output_dir $OUT/eval/seen_teachers ${SEEN[*]}" \
     "ev_seen_tagi ${EV[*]} --hypernet $OUT/ft_tagi/hypernet --output_dir $OUT/eval/seen_tagi ${SEEN[*]}" \
     "ev_seen_concat ${EV[*]} --adapter $OUT/ft_concat/baseline_lora --output_dir $OUT/eval/seen_concat ${SEEN[*]}"

WALL=$(( $(date +%s) - START ))
log "pipeline wall time ${WALL}s"
# 5. report: small logs next to docs/results.md (stage logs, metrics, results.json; no weights)
mkdir -p "$DOCS/reproduce_log"
cp "$OUT/commands.txt" "$DOCS/reproduce_log/commands.txt"
cp "$OUT/reproduce.log" "$DOCS/reproduce_log/reproduce.log"
for d in "$OUT"/logs/*.log; do grep -v -e "Warn" -e "warn(" "$d" | tail -40 > "$DOCS/reproduce_log/$(basename "$d")"; done
for e in "$OUT"/eval/*/; do cp "$e/results.json" "$DOCS/reproduce_log/results_$(basename "$e").json" 2>/dev/null || true; done
python scripts/make_report.py --run "$OUT" --docs "$DOCS" --wall_s "$WALL"
log "wrote $DOCS/results.md"
