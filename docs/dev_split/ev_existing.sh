#!/usr/bin/env bash
# Dev-split evaluation of the finetuned runs of `make reproduce` (runs/reproduce/s*/ft_*).
cd /work/main
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
R=runs/reproduce; O=runs/devsweep
D="data.setting=def_pos data.max_instruction_length=128"
EV="python launchers/evaluate.py --deepspeed ds_configs/z2.json --max_new_tokens 28 --batch_size 32 --split dev"
{
for s in 0 1 2; do
  for m in tagi no_kl no_param no_fusion no_pretrain; do echo "ev_${m}_s$s|$EV --hypernet $R/s$s/ft_$m/hypernet --output_dir $O/eval/${m}_s$s --set data.max_instances_per_task=50 $D"; done
  for m in concat no_instruction; do echo "ev_${m}_s$s|$EV --adapter $R/s$s/ft_$m/baseline_lora --output_dir $O/eval/${m}_s$s --set data.max_instances_per_task=50 $D"; done
done
} > $O/round_existing.txt
runit() { name=${1%%|*}; cmd=${1#*|}; echo "$(date +%T) start $name"; $cmd > $O/$name.log 2>&1 && echo "$(date +%T) done $name" || echo "$(date +%T) FAILED $name"; }
export -f runit; export O
tr '\n' '\0' < $O/round_existing.txt | xargs -0 -P 2 -I{} bash -c 'runit "$@"' _ {}
