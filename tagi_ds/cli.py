"""The flags every launcher shares (DESIGN.md's contract) and their resolution into one TagiConfig.

Precedence: recipe < ``--set key=value`` < dedicated flags (``--max_steps`` etc.). Unknown flags and keys
are errors. Errors in config or data print one line naming the flag, key or file and exit with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from tagi_ds.config import ConfigError, TagiConfig, apply_overrides
from tagi_ds.recipes import RECIPES, get_recipe

STAGE_DEFAULT_OUT = {"teachers": "runs/teachers", "pretrain": "runs/pretrain", "finetune": "runs/finetune",
                     "evaluate": "runs/eval", "generate_adapter": "runs/adapter"}


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", default="tiny", choices=list(RECIPES),
                   help="named starting config; tiny = built-in tiny T5 on the built-in task suite (CPU)")
    p.add_argument("--deepspeed", default=None, metavar="PATH",
                   help="DeepSpeed JSON (ZeRO settings only); default ds_configs/z3.json")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher; leave it")
    p.add_argument("--model_name_or_path", default=None, metavar="PATH",
                   help="local HF checkpoint dir for the backbone (default: recipe's shape, random init)")
    p.add_argument("--data", default=None, metavar="SPEC",
                   help="builtin | sni:DIR | p3:DIR | text:FILE_OR_DIR (default: the recipe's, builtin)")
    p.add_argument("--output_dir", default=None, metavar="DIR", help="run directory (default runs/<stage>)")
    p.add_argument("--seed", type=int, default=None, help="global seed (train.seed)")
    p.add_argument("--mode", default=None, choices=["tagi", "concat", "no_instruction"],
                   help="tagi (generated adapters), or a baseline: concat (instruction + input) / no_instruction")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set hypernet.rank=16 loss.kl_weight=0.5")
    return p


def training_parser(stage: str, description: str) -> argparse.ArgumentParser:
    p = base_parser(f"{stage}.py", description)
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps (train.max_steps)")
    p.add_argument("--save_steps", type=int, default=None, help="checkpoint every N steps (train.save_steps)")
    p.add_argument("--resume_from_checkpoint", default=None, metavar="PATH|latest",
                   help="'latest' (in --output_dir/checkpoints) or a checkpoint dir")
    if stage == "finetune":
        p.add_argument("--teachers", default=None, metavar="DIR",
                       help="teachers/ from train_teachers.py: targets of the KL and parameter-alignment terms")
        p.add_argument("--init_hypernet", default=None, metavar="DIR",
                       help="hypernet/ from pretrain.py to start from (default: from scratch)")
    return p


def resolve_config(args: argparse.Namespace) -> TagiConfig:
    cfg = apply_overrides(get_recipe(args.recipe), args.overrides)
    impl = os.environ.get("TAGI_ADAPTER_IMPL")  # documented escape hatch; read here and nowhere else
    if impl:
        cfg = apply_overrides(cfg, [f"model.adapter_impl={impl}"])
    if args.model_name_or_path:
        cfg.model.model_name_or_path = args.model_name_or_path
    if args.data:
        cfg.data.spec = args.data
    if args.mode:
        cfg.mode = args.mode
    if args.seed is not None:
        cfg.train.seed = args.seed
    for flag in ("max_steps", "save_steps"):
        value = getattr(args, flag, None)
        if value is not None:
            if value <= 0:
                raise ConfigError(f"--{flag} must be > 0, got {value}")
            setattr(cfg.train, flag, value)
    cfg.validate()
    from tagi_ds.data import parse_spec

    parse_spec(cfg.data.spec)  # every stage: an unknown scheme or missing path fails before any work
    return cfg


def output_dir(args: argparse.Namespace, stage: str) -> Path:
    return Path(args.output_dir or STAGE_DEFAULT_OUT[stage])


def train_main(stage: str, doc: str, argv: list[str] | None = None) -> None:
    """A training launcher's whole body: parse -> resolve the config -> run the stage."""
    args = training_parser(stage, doc.strip().split("\n")[0]).parse_args(argv)
    cfg = resolve_config(args)
    from tagi_ds.train.loop import RunArgs, run  # heavy (deepspeed, transformers): after --help

    run(cfg, RunArgs(stage=stage, output_dir=output_dir(args, stage), deepspeed=args.deepspeed,
                     resume_from_checkpoint=args.resume_from_checkpoint,
                     teachers=getattr(args, "teachers", None), init_hypernet=getattr(args, "init_hypernet", None)))


def guarded(main: Callable[[], object]) -> None:
    """Run ``main``; config and data errors become one line on stderr and exit code 2."""
    from tagi_ds.data import DataError

    try:
        main()
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
