#!/usr/bin/env python
"""Stage 1 — hypernetwork pretraining on plain text split a | b | c.

The hypernetwork reads a, the frozen backbone (with the generated adapters) reads b, the loss is
cross-entropy on c. Writes OUTPUT_DIR/hypernet/. With no flag it runs the embedded default (tiny T5,
built-in corpus) on CPU:

    deepspeed launchers/pretrain.py --deepspeed ds_configs/z3.json
"""

from tagi_ds.cli import guarded, output_dir, resolve_config, training_parser


def main(argv=None) -> None:
    args = training_parser("pretrain", __doc__.split("\n")[0]).parse_args(argv)
    cfg = resolve_config(args)
    from tagi_ds.train.loop import RunArgs, run  # heavy (deepspeed, transformers): after --help

    run(cfg, RunArgs(stage="pretrain", output_dir=output_dir(args, "pretrain"), deepspeed=args.deepspeed,
                     resume_from_checkpoint=args.resume_from_checkpoint,
                     teachers=getattr(args, "teachers", None), init_hypernet=getattr(args, "init_hypernet", None)))


if __name__ == "__main__":
    guarded(main)
