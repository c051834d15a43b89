#!/usr/bin/env python
"""Stage 2 — finetune the hypernetwork on instruction tasks: CE + l1 KL(teacher || student) + l2 align.

Teachers come from --teachers (train_teachers.py output); the hypernetwork starts from --init_hypernet
(pretrain.py output) or from scratch. --mode concat / no_instruction train the baselines instead.

    deepspeed --num_gpus 2 launchers/finetune.py --deepspeed ds_configs/z3.json \\
        --teachers runs/teachers/teachers --init_hypernet runs/pretrain/hypernet --output_dir runs/finetune
"""

from tagi_ds.cli import guarded, train_main

if __name__ == "__main__":
    guarded(lambda: train_main("finetune", __doc__))
