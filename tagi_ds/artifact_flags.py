"""Flags that name an artifact dir (``--hypernet``, ``--adapter``, ``--teachers``): the dir, checked, and the
config it fixes.

A run that reads an artifact takes its model from it: the config the artifact was trained with (backbone
shape, sites, ranks) is the base, ``--set`` and the dedicated flags go on top (``cli.resolve_config``), and a
``--recipe``, if given, must agree with the artifact's. Used by ``launchers/generate_adapter.py`` and
``launchers/evaluate.py`` (:func:`resolve_evaluation`: which mode and artifact its flags select).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tagi_ds import artifacts, stages
from tagi_ds.cli import output_dir, resolve_config
from tagi_ds.config import ConfigError, TagiConfig
from tagi_ds.eval.evaluate import EvalArgs

BANK_FILES = ("teachers.safetensors", "rows.json", "config.json")
EVAL_FLAGS = ("hypernet", "adapter", "teachers")  # evaluate.py: one of them names what is evaluated
DIRS = {  # flag -> (the artifact dir it names, the files that dir holds)
    "hypernet": ("hypernet/", ("generator.safetensors", "config.json")),
    "adapter": ("baseline_lora/", BANK_FILES),
    "teachers": ("teachers/", BANK_FILES),
}


def artifact_dir(flag: str, path: str) -> Path:
    """``--flag path``: an existing dir with the files of the artifact that flag names."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"--{flag} {path!r}: no such directory")
    kind, needs = DIRS[flag]
    for name in needs:
        if not (p / name).is_file():
            raise ConfigError(f"--{flag} {path!r}: no {name} (expected a {kind} dir written by tagi-ds)")
    return p


def artifact_config(
    args: argparse.Namespace, path: Path | None, mode: str | None = None, flag: str | None = None
) -> TagiConfig:
    """The config: the artifact's own (backbone shape, sites, ranks) < ``--set`` < flags (``cli.resolve_config``).

    ``--recipe`` is the base only without an artifact; with one it must agree with the artifact's recipe.
    ``mode`` (a TagiConfig mode) replaces ``--mode``.
    """
    ns = argparse.Namespace(**vars(args))
    if mode is not None:
        ns.mode = mode
    if path is not None:
        saved = artifacts.read_config(path, f"--{flag}" if flag else "artifact")
        if args.recipe is not None and args.recipe != saved.recipe:
            raise ConfigError(
                f"--recipe {args.recipe} disagrees with {path / 'config.json'} (recipe "
                f"{saved.recipe}); drop --recipe: the artifact fixes the model"
            )
        tree = saved.to_dict()
        tree.pop("mode")
        ns.recipe, ns.overrides = saved.recipe, as_overrides(tree) + list(args.overrides)
    else:
        ns.recipe = args.recipe or "tiny"
    return resolve_config(ns)


def as_overrides(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """A saved config as ``key=value`` strings, so the shared resolver applies it under ``--set`` and flags."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out.extend(as_overrides(value, f"{prefix}{key}."))
        elif value is None:
            out.append(f"{prefix}{key}=none")
        elif isinstance(value, (list, bool)):
            out.append(f"{prefix}{key}={json.dumps(value)}")
        else:
            out.append(f"{prefix}{key}={value}")
    return out


def eval_mode(args: argparse.Namespace) -> tuple[str, str | None, Path | None]:
    """``(eval mode, artifact flag, artifact dir)`` from ``--mode`` and the one artifact flag given."""
    given = [f for f in EVAL_FLAGS if getattr(args, f, None)]
    if len(given) > 1:
        raise ConfigError(f"--{given[0]} and --{given[1]} exclude each other: evaluate one thing per run")
    flag = given[0] if given else None
    own = stages.flag_mode(flag) if flag else None  # the mode the flag selects (--adapter: its artifact says)
    if flag == "hypernet":
        if args.mode not in (None, own):
            raise ConfigError(f"--hypernet is evaluated in mode {own}, got --mode {args.mode}")
        return own, flag, artifact_dir(flag, args.hypernet)
    if flag == "teachers":
        if args.mode is not None:  # its mode is no config mode: any --mode contradicts it
            raise ConfigError(
                f"--teachers selects mode {own} (instruction + input, each task's own teacher); drop --mode {args.mode}"
            )
        return own, flag, artifact_dir(flag, args.teachers)
    source = stages.MODES[args.mode].source if args.mode is not None else None
    if source is not None and not source.bare:  # a hypernetwork is nothing without its artifact
        raise ConfigError(f"--mode {args.mode} needs --{source.flag} DIR (a {source.dir}/ dir from {source.made_by})")
    if flag == "adapter":
        path = artifact_dir(flag, args.adapter)
        rows, meta = artifacts.read_teacher_rows(path)
        if rows != {"*": 0}:
            raise ConfigError(
                f"--adapter {args.adapter!r}: rows.json has {len(rows)} rows; a baseline_lora/ dir has "
                "one shared row (a teachers/ dir goes to --teachers)"
            )
        trained = meta["tagi"].get("mode")
        if args.mode is not None and args.mode != trained:
            raise ConfigError(
                f"--adapter {args.adapter!r} was trained in mode {trained}; evaluate it with "
                f"--mode {trained}, not {args.mode}"
            )
        return trained, flag, path
    if args.mode is None:
        raise ConfigError(
            "nothing to evaluate: give --hypernet DIR (tagi), --adapter DIR or --mode concat|"
            "no_instruction (baselines; bare backbone without --adapter), or --teachers DIR"
        )
    return args.mode, None, None


def resolve_evaluation(args: argparse.Namespace) -> tuple[TagiConfig, EvalArgs]:
    """``launchers/evaluate.py``'s flags -> (config, EvalArgs); every inconsistency is a one-line ConfigError."""
    mode, flag, path = eval_mode(args)
    for key in ("max_new_tokens", "batch_size"):
        value = getattr(args, key)
        if value is not None and value <= 0:
            raise ConfigError(f"--{key}: must be > 0 ({value})")
    row = stages.MODES[mode]
    cfg = artifact_config(args, path, row.config_mode, flag)  # a teacher reads instruction + input: concat
    if row.source.per_task:
        cfg, _ = artifacts.adopt_teacher(cfg, path)  # rank, alpha, granularity from the dir
    return cfg, EvalArgs(
        output_dir=output_dir(args, "evaluate"),
        mode=mode,
        artifact=path,
        kind=args.task,
        split=args.split,
        deepspeed=args.deepspeed,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        flops=args.flops,
    )
