#!/usr/bin/env python
"""Stage 2 — finetune the hypernetwork on instruction tasks: CE + l1 KL(teacher || student) + l2 align.

Teachers come from --teachers (train_teachers.py output); the hypernetwork starts from --init_hypernet
(pretrain.py output) or from scratch. --mode concat / no_instruction train the baselines instead.

    deepspeed --num_gpus 2 launchers/finetune.py --deepspeed ds_configs/z3.json \\
        --teachers runs/teachers/teachers --init_hypernet runs/pretrain/hypernet --output_dir runs/finetune
"""

from tagi_ds.cli import guarded, output_dir, resolve_config, training_parser


def main(argv=None) -> None:
    args = training_parser("finetune", __doc__.split("\n")[0]).parse_args(argv)
    cfg = resolve_config(args)
    from tagi_ds.train.loop import RunArgs, run  # heavy (deepspeed, transformers): after --help

    run(cfg, RunArgs(stage="finetune", output_dir=output_dir(args, "finetune"), deepspeed=args.deepspeed,
                     resume_from_checkpoint=args.resume_from_checkpoint,
                     teachers=getattr(args, "teachers", None), init_hypernet=getattr(args, "init_hypernet", None)))


if __name__ == "__main__":
    guarded(main)
