#!/usr/bin/env bash
# Backbone pretrained 3000 steps (vs 1200): teachers, hypernet pretraining, TAGI + concat (seeds 0, 1) on it,
# evaluated on the dev split. Def+2Pos, everything else as make reproduce.
cd /work/main
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
O=runs/devsweep; B=$O/bb3k; BB=$O/backbone3k
mkdir -p $B
D="data.setting=def_pos data.max_instruction_length=128"
C="--recipe mini --data builtin --deepspeed ds_configs/z2.json --model_name_or_path $BB"
runit() { name=${1%%|*}; cmd=${1#*|}; echo "$(date +%T) start $name"; $cmd > $B/$name.log 2>&1 && echo "$(date +%T) done $name" || echo "$(date +%T) FAILED $name"; }
export -f runit; export B
FT="python launchers/finetune.py $C --max_steps 1000"
EV="python launchers/evaluate.py --deepspeed ds_configs/z2.json --max_new_tokens 28 --batch_size 32 --split dev"
{
echo "teachers|python launchers/train_teachers.py $C --seed 0 --output_dir $B/teachers --max_steps 600 --set train.lr=3e-3 teacher.granularity=category $D"
echo "pretrain|python launchers/pretrain.py $C --seed 0 --output_dir $B/pretrain --max_steps 400 --set train.lr=1e-3"
} > $B/r1.txt
{
for s in 0 1; do
echo "tagi_s$s|$FT --seed $s --teachers $B/teachers/teachers --init_hypernet $B/pretrain/hypernet --output_dir $B/tagi_s$s --set train.lr=1e-3 $D"
echo "concat_s$s|$FT --seed $s --mode concat --output_dir $B/concat_s$s --set train.lr=3e-3 $D"
done
} > $B/r2.txt
{
for s in 0 1; do
echo "ev_tagi_s$s|$EV --hypernet $B/tagi_s$s/hypernet --output_dir $B/eval/tagi_s$s --set data.max_instances_per_task=50 $D"
echo "ev_concat_s$s|$EV --adapter $B/concat_s$s/baseline_lora --output_dir $B/eval/concat_s$s --set data.max_instances_per_task=50 $D"
done
} > $B/r3.txt
for r in r1 r2 r3; do tr '\n' '\0' < $B/$r.txt | xargs -0 -P 2 -I{} bash -c 'runit "$@"' _ {}; done
