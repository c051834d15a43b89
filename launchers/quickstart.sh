#!/usr/bin/env bash
# Quickstart: every stage + evaluation on the embedded default (built-in tiny T5, built-in task suite),
# on NP CPU ranks (default 2) under DeepSpeed ZeRO-3, then a results table. About 5 minutes on 2 idle cores
# (README: Times).
#
#   bash launchers/quickstart.sh                 # OUT=runs/quickstart NP=2
#   OUT=/tmp/qs NP=1 STEPS=30 bash launchers/quickstart.sh
#
# The tiny backbone is random-init and frozen, so the numbers show the pipeline works, not that TAGI
# beats anything: `make reproduce` (docs/results.md) is the miniature reproduction on a pretrained backbone.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/quickstart}
NP=${NP:-2}
STEPS=${STEPS:-60}
DS=${DS:-ds_configs/z3_tiny.json}  # threshold 0: the tiny backbone is partitioned across the ranks
# Each command is printed as it runs (not as the plain `deepspeed` command it stands in for: copied from the
# log, that one takes port 29500 and collides with any other DeepSpeed job on the machine).
x() { echo "+ $*"; "$@"; }
# tagi_ds.launch is the deepspeed launcher on a free port (or $MASTER_PORT), so that this run never collides
# with another DeepSpeed job on the machine; it prints the port it uses.
run() { x python -m tagi_ds.launch --num_gpus "$NP" "$@"; }
common=(--deepspeed "$DS" --max_steps "$STEPS")
evalset=(--deepspeed "$DS" --max_new_tokens 32 --set data.max_instances_per_task=20)

run launchers/train_teachers.py "${common[@]}" --output_dir "$OUT/teachers"
run launchers/pretrain.py "${common[@]}" --output_dir "$OUT/pretrain"
run launchers/finetune.py "${common[@]}" --output_dir "$OUT/finetune" \
    --teachers "$OUT/teachers/teachers" --init_hypernet "$OUT/pretrain/hypernet"
run launchers/finetune.py "${common[@]}" --mode concat --output_dir "$OUT/concat"
run launchers/evaluate.py "${evalset[@]}" --hypernet "$OUT/finetune/hypernet" --output_dir "$OUT/eval/tagi"
run launchers/evaluate.py "${evalset[@]}" --adapter "$OUT/concat/baseline_lora" --output_dir "$OUT/eval/concat"
run launchers/evaluate.py "${evalset[@]}" --mode no_instruction --output_dir "$OUT/eval/no_instruction"
x python -m tagi_ds.eval.table concat="$OUT/eval/concat" tagi="$OUT/eval/tagi" \
    no_instruction="$OUT/eval/no_instruction"
echo "artifacts in $OUT (hypernet: $OUT/finetune/hypernet; teachers: $OUT/teachers/teachers)"
