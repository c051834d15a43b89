"""Flags that name an artifact dir (``--hypernet``, ``--adapter``, ``--teachers``): the dir, checked, and the
config it fixes.

A run that reads an artifact takes its model from it: the config the artifact was trained with (backbone
shape, sites, ranks) is the base, ``--set`` and the dedicated flags go on top (``cli.resolve_config``), and a
``--recipe``, if given, must agree with the artifact's. Used by ``launchers/evaluate.py`` (through
``eval.evaluate.resolve``) and ``launchers/generate_adapter.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tagi_ds import artifacts
from tagi_ds.cli import resolve_config
from tagi_ds.config import ConfigError, TagiConfig

BANK_FILES = ("teachers.safetensors", "rows.json", "config.json")
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


def artifact_config(args: argparse.Namespace, path: Path | None, mode: str | None = None,
                    flag: str | None = None) -> TagiConfig:
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
            raise ConfigError(f"--recipe {args.recipe} disagrees with {path / 'config.json'} (recipe "
                              f"{saved.recipe}); drop --recipe: the artifact fixes the model")
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
