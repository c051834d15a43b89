#!/usr/bin/env python
"""Stage 0 — train every task's (or category's) teacher LoRA in ONE job, through the LoRA bank.

Each micro-batch holds k tasks; each task's examples (instruction + input, as the teacher reads them) go
through the frozen backbone with that task's bank row. Writes OUTPUT_DIR/teachers/ (factors + rows.json).

    deepspeed --num_gpus 2 launchers/train_teachers.py --deepspeed ds_configs/z3.json --output_dir runs/teachers
"""

from tagi_ds.cli import guarded, train_main

if __name__ == "__main__":
    guarded(lambda: train_main("teachers", __doc__))
