#!/usr/bin/env bash
# Fusion marker on the dev split: pretrain + finetune (3 seeds) + dev evaluation. Def+2Pos, mini backbone.
cd /work/main
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
R=runs/reproduce; O=runs/devsweep
D="data.setting=def_pos data.max_instruction_length=128"
C="--recipe mini --data builtin --deepspeed ds_configs/z2.json --model_name_or_path $R/backbone"
M="hypernet.fusion_marker=true"
runit() { name=${1%%|*}; cmd=${1#*|}; echo "$(date +%T) start $name"; $cmd > $O/$name.log 2>&1 && echo "$(date +%T) done $name" || echo "$(date +%T) FAILED $name"; }
export -f runit; export O
OMP_NUM_THREADS=2 runit "pretrain_marker|python launchers/pretrain.py $C --seed 0 --output_dir $O/pretrain_marker --max_steps 400 --set train.lr=1e-3 $M"
FT="python launchers/finetune.py $C --max_steps 1000 --teachers $R/teachers/teachers --init_hypernet $O/pretrain_marker/hypernet"
EV="python launchers/evaluate.py --deepspeed ds_configs/z2.json --max_new_tokens 28 --batch_size 32 --split dev"
for s in 0 1 2; do echo "marker_s$s|$FT --seed $s --output_dir $O/marker_s$s --set train.lr=1e-3 $D $M"; done > $O/round_marker.txt
for s in 0 1 2; do echo "ev_marker_s$s|$EV --hypernet $O/marker_s$s/hypernet --output_dir $O/eval/marker_s$s --set data.max_instances_per_task=50 $D"; done >> $O/round_marker.txt
tr '\n' '\0' < <(head -3 $O/round_marker.txt) | xargs -0 -P 2 -I{} bash -c 'runit "$@"' _ {}
tr '\n' '\0' < <(tail -3 $O/round_marker.txt) | xargs -0 -P 2 -I{} bash -c 'runit "$@"' _ {}
