"""The flags every launcher shares (README: "Flags shared by every training launcher") and their resolution into
one TagiConfig.

Precedence: recipe < ``--set key=value`` < dedicated flags (``--max_steps`` etc.). Unknown flags and keys
are errors. Every entry point parses with :class:`Parser` (argparse errors as one line plus a ``--help``
hint) and runs under :func:`guarded` (bad input: one line ``error: <where>: <what> (<value>)``, exit code
2, nothing written; see ``tagi_ds.runtime.preflight``).
"""

from __future__ import annotations

import argparse
import os
import textwrap
from pathlib import Path

from tagi_ds.config import ConfigError, DataConfig, TagiConfig, apply_overrides, choices, field_docs, from_dict
from tagi_ds.recipes import RECIPES, get_recipe
from tagi_ds.runtime.flags import Parser, add_set_flag
from tagi_ds.runtime.preflight import guarded
from tagi_ds.stages import STAGES

STAGE_DEFAULT_OUT = {
    "teachers": "runs/teachers",
    "pretrain": "runs/pretrain",
    "finetune": "runs/finetune",
    "evaluate": "runs/eval",
    "generate_adapter": "runs/adapter",
}
INPUT_HELP = {
    "teachers": "teachers/ from train_teachers.py: targets of the KL and parameter-alignment terms",
    "init_hypernet": "hypernet/ from pretrain.py to start from (default: from scratch)",
    "teacher_model": "a frozen, separately finetuned backbone dir of the student's family and vocabulary: its "
    "logits are the KL target instead of --teachers' LoRA bank (which then gives only the alignment target: "
    "loss.param_weight > 0 needs both)",
}
RECIPE_HELP = {
    "tiny": "built-in tiny T5, random init, CPU-sized",
    "tiny-llama": "built-in tiny LLaMA",
    "mini": "the small T5 of the miniature reproduction, scripts/reproduce.sh",
}
# engine.default_ds_config's rule, spelled out here: cli must not import the engine (torch) before --help
# (tests/runtime/test_ds_configs.py holds the two to each other).
DS_DEFAULT_HELP = "ds_configs/z3_tiny.json for the tiny* recipes, else ds_configs/z3.json"
__all__ = [
    "Parser",
    "add_set_flag",
    "base_parser",
    "guarded",
    "output_dir",
    "resolve_config",
    "train_main",
    "training_parser",
]


def recipe_help(default: str | None) -> str:
    described = ", ".join(f"{n} ({RECIPE_HELP[n]})" for n in RECIPES if n in RECIPE_HELP)
    presets = ", ".join(n for n in RECIPES if n not in RECIPE_HELP)
    return f"named starting config: {described}; shape presets of the public checkpoints: {presets}" + (
        f" (default: {default})" if default else ""
    )


def base_parser(
    prog: str, description: str, epilog: str | None = None, recipe_default: str | None = "tiny"
) -> argparse.ArgumentParser:
    """The shared flags. ``recipe_default`` None: the run's artifact fixes the model (evaluate, generate_adapter)."""
    p = Parser(prog=prog, description=description, epilog=epilog)
    p.add_argument(
        "--recipe",
        default=recipe_default,
        choices=list(RECIPES),
        metavar="NAME",
        help=recipe_help(recipe_default)
        if recipe_default
        else recipe_help(None) + " (default: the artifact's own recipe; tiny without an artifact)",
    )
    p.add_argument(
        "--deepspeed",
        default=None,
        metavar="PATH",
        help=f"DeepSpeed JSON, ZeRO settings only (default: {DS_DEFAULT_HELP})",
    )
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher; leave it")
    p.add_argument(
        "--model_name_or_path",
        default=None,
        metavar="PATH",
        help="local HF checkpoint dir for the backbone (default: the recipe's shape, random init)",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="SPEC",
        help=f"{field_docs(DataConfig)['spec']} (default: the recipe's, builtin)",
    )
    stage = prog.removesuffix(".py").removeprefix("train_")  # train_teachers.py -> teachers
    p.add_argument(
        "--output_dir",
        default=None,
        metavar="DIR",
        help=f"run directory (default: {STAGE_DEFAULT_OUT.get(stage, 'runs/<stage>')})",
    )
    p.add_argument("--seed", type=int, default=None, help="global seed (default: train.seed of the recipe, 42)")
    p.add_argument(
        "--mode",
        default=None,
        choices=choices(TagiConfig, "mode"),
        help=f"{field_docs(TagiConfig)['mode']} (default: {TagiConfig.mode})",
    )
    add_set_flag(p)
    return p


def _default_run(stage: str) -> str:
    """What the launcher does with no flag (named in --help): what it reads, how many steps, where it writes."""
    cfg, spec = get_recipe("tiny"), STAGES[stage]
    reads = {
        "corpus": "the built-in text corpus (split a|b|c)",
        "tasks": "the built-in task suite's 76 training tasks",
    }[spec.data]
    line = (
        f"With no flag: recipe tiny (built-in tiny T5, random init, frozen), reads {reads}, trains "
        f"{cfg.train.max_steps} steps (train.max_steps; a checkpoint every {cfg.train.save_steps}) under ZeRO-3 "
        f"(ds_configs/z3_tiny.json), one process or the ranks the deepspeed launcher starts, and writes "
        f"{STAGE_DEFAULT_OUT[stage]}/."
    )
    if spec.distils:
        line += (
            " Finetuning needs --teachers DIR for its KL and alignment terms (or --teacher_model DIR for the KL "
            "with loss.param_weight=0), or --set loss.kl_weight=0 loss.param_weight=0."
        )
    line += " Bad input: one line 'error: ...' and exit code 2, nothing written (README: exit codes)."
    return textwrap.fill(line, width=100)


def training_parser(stage: str, description: str) -> argparse.ArgumentParser:
    p = base_parser(STAGES[stage].launcher, description, epilog=_default_run(stage))
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps (default: train.max_steps)")
    p.add_argument("--save_steps", type=int, default=None, help="checkpoint every N steps (default: train.save_steps)")
    p.add_argument(
        "--resume_from_checkpoint",
        default=None,
        metavar="PATH|latest",
        help="'latest' (in --output_dir/checkpoints: the newest complete checkpoint) or a checkpoint dir",
    )
    p.add_argument(
        "--start_over",
        action="store_true",
        help="a fresh run into an --output_dir that holds another run's checkpoints: move its checkpoints/ "
        "and metrics.jsonl into OUTPUT_DIR/replaced-<time>/ (kept; delete it yourself)",
    )
    for flag in STAGES[stage].inputs:
        p.add_argument(f"--{flag}", default=None, metavar="DIR", help=INPUT_HELP[flag])
    return p


def resolve_config(args: argparse.Namespace) -> TagiConfig:
    cfg = apply_overrides(get_recipe(args.recipe), args.overrides)
    impl = os.environ.get("TAGI_ADAPTER_IMPL")  # documented escape hatch; read here and nowhere else
    if impl:
        cfg = apply_overrides(cfg, [f"model.adapter_impl={impl}"])
    if args.model_name_or_path:
        from tagi_ds.backbones.base import checkpoint_shape

        cfg.model.model_name_or_path = args.model_name_or_path
        cfg = from_dict({"model": checkpoint_shape(args.model_name_or_path, cfg.model.arch)}, cfg)
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
                raise ConfigError(f"--{flag}: must be > 0 ({value})")
            setattr(cfg.train, flag, value)
    cfg.validate()
    from tagi_ds.data import parse_spec

    parse_spec(cfg.data.spec)  # every stage: an unknown scheme or missing path fails before any work
    return cfg


def output_dir(args: argparse.Namespace, stage: str) -> Path:
    return Path(args.output_dir or STAGE_DEFAULT_OUT[stage])


def train_main(stage: str, doc: str, argv: list[str] | None = None) -> None:
    """A training launcher's whole body: parse -> resolve the config -> preflight -> run the stage."""
    args = training_parser(stage, doc.strip().split("\n")[0]).parse_args(argv)
    cfg = resolve_config(args)
    from tagi_ds.train.loop import RunArgs, preflight, train  # heavy (deepspeed, transformers): after --help

    checked = preflight(
        cfg,
        RunArgs(
            stage=stage,
            output_dir=output_dir(args, stage),
            deepspeed=args.deepspeed,
            resume_from_checkpoint=args.resume_from_checkpoint,
            start_over=args.start_over,
            teachers=getattr(args, "teachers", None),
            init_hypernet=getattr(args, "init_hypernet", None),
            teacher_model=getattr(args, "teacher_model", None),
        ),
    )
    train(checked)
