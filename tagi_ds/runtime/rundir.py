"""A run's start and its directory: what every entry point does once its inputs are checked.

:func:`start` joins the process group, seeds every RNG and writes ``config.json`` (the resolved config, the final
DeepSpeed dict, world size and the precision that runs) before any other file of the run; files are written
whole or not at all (:func:`atomic_write_text`).
"""

from __future__ import annotations

import json
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from tagi_ds.config import TagiConfig
from tagi_ds.runtime import dist
from tagi_ds.runtime import engine as ds_engine


def start(cfg: TagiConfig, ds: dict, args, world_size: int | None = None) -> Path:
    """Join the process group (one of ``world_size`` ranks, when given), seed, write ``config.json``; returns
    the run directory, ``args.output_dir``. A collective: every rank calls it."""
    # torch 2.13 deprecates the collectives DeepSpeed 0.19 calls; one warning per call floods the log.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    dist.init()
    if world_size is not None and dist.world_size() != world_size:
        raise RuntimeError(f"preflight saw WORLD_SIZE={world_size}, the process group has {dist.world_size()} ranks")
    seed_everything(cfg.train.seed)
    out = Path(args.output_dir)
    write_config(out, cfg, ds, args)
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_config(out: Path, cfg: TagiConfig, ds: dict, args) -> None:
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        record = {"stage": args.stage, "world_size": dist.world_size(), "precision": ds_engine.precision(cfg),
                  "tagi": cfg.to_dict(), "deepspeed": ds,
                  "args": {k: str(v) if v is not None else None for k, v in vars(args).items()}}
        atomic_write_text(out / "config.json", json.dumps(record, indent=2))
    dist.barrier()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
