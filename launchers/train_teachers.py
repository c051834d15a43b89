#!/usr/bin/env python
"""Stage 0 — train every task's (or category's) teacher LoRA in ONE job, through the LoRA bank.

Each micro-batch holds k tasks; each task's examples (instruction + input, as the teacher reads them) go
through the frozen backbone with that task's bank row. Writes OUTPUT_DIR/teachers/ (factors + rows.json).

    deepspeed --num_gpus 2 launchers/train_teachers.py --deepspeed ds_configs/z3.json --output_dir runs/teachers
"""

from tagi_ds.cli import guarded, output_dir, resolve_config, training_parser


def main(argv=None) -> None:
    args = training_parser("teachers", __doc__.split("\n")[0]).parse_args(argv)
    cfg = resolve_config(args)
    from tagi_ds.train.loop import RunArgs, run  # heavy (deepspeed, transformers): after --help

    run(cfg, RunArgs(stage="teachers", output_dir=output_dir(args, "teachers"), deepspeed=args.deepspeed,
                     resume_from_checkpoint=args.resume_from_checkpoint,
                     teachers=getattr(args, "teachers", None), init_hypernet=getattr(args, "init_hypernet", None)))


if __name__ == "__main__":
    guarded(main)
