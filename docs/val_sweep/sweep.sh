#!/usr/bin/env bash
# λ1 (KL weight) on a validation split of training tasks (never the held-out tasks). Def+2Pos, mini backbone.
cd /work/main
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
R=runs/reproduce; O=runs/valsweep
VAL=task004_words_dedupe,task010_words_uppercase,task016_words_longest,task022_words_initials,task028_word_remove_vowels,task034_word_count_letters,task040_word_uppercase_then_double,task046_pair_absdiff,task052_digits_add_one,task058_digits_last,task064_sentence_about_weather,task070_sentence_count,task076_numword_to_digit_then_times_two
D="data.setting=def_pos data.max_instruction_length=128"
C="--recipe mini --data builtin --deepspeed ds_configs/z2.json --model_name_or_path $R/backbone"
FT="python launchers/finetune.py $C --max_steps 1000"
{
echo "teachers|python launchers/train_teachers.py $C --seed 0 --output_dir $O/teachers --max_steps 600 --set train.lr=3e-3 teacher.granularity=category $D data.exclude_tasks=$VAL"
echo "concat_s0|$FT --seed 0 --mode concat --output_dir $O/concat_s0 --set train.lr=3e-3 $D data.exclude_tasks=$VAL"
} > $O/round1.txt
jobs_for() { for s in $1; do for kl in 1.0 0.0 0.3; do
  echo "kl${kl}_s$s|$FT --seed $s --teachers $O/teachers/teachers --init_hypernet $R/pretrain/hypernet --output_dir $O/kl${kl}_s$s --set train.lr=1e-3 $D data.exclude_tasks=$VAL loss.kl_weight=$kl"
done; done; }
{ jobs_for 0; echo "concat_s1|$FT --seed 1 --mode concat --output_dir $O/concat_s1 --set train.lr=3e-3 $D data.exclude_tasks=$VAL"; jobs_for 1; } > $O/round2.txt
runit() { name=${1%%|*}; cmd=${1#*|}; echo "$(date +%T) start $name"; $cmd > $O/$name.log 2>&1 && echo "$(date +%T) done $name" || echo "$(date +%T) FAILED $name"; }
export -f runit; export O
tr '\n' '\0' < $O/round1.txt | xargs -0 -P 2 -I{} bash -c 'runit "$@"' _ {}
tr '\n' '\0' < $O/round2.txt | xargs -0 -P 2 -I{} bash -c 'runit "$@"' _ {}
EV="python launchers/evaluate.py --deepspeed ds_configs/z2.json --max_new_tokens 28 --batch_size 32 --split train"
{
for r in concat_s0 concat_s1; do echo "ev_$r|$EV --adapter $O/$r/baseline_lora --output_dir $O/eval/$r --set data.tasks=$VAL data.max_instances_per_task=50 $D"; done
for s in 0 1; do for kl in 1.0 0.0 0.3; do echo "ev_kl${kl}_s$s|$EV --hypernet $O/kl${kl}_s$s/hypernet --output_dir $O/eval/kl${kl}_s$s --set data.tasks=$VAL data.max_instances_per_task=50 $D"; done; done
} > $O/round3.txt
tr '\n' '\0' < $O/round3.txt | xargs -0 -P 2 -I{} bash -c 'runit "$@"' _ {}
for e in $O/eval/*/; do python -c "import json,sys; r=json.load(open('$e/results.json')); print('$(basename $e)', round(r['rougeL'],2), round(r['cost']['flops_per_example']/1e6,1))"; done
