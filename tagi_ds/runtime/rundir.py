"""A run's start and its directory: what every entry point does once its inputs are checked.

:func:`start` takes a typed :class:`RunStart` (the training and evaluation entry points and the PEFT export
build one), joins the process group, seeds every RNG, takes the run directory's lock (:func:`lock`: one run per
``--output_dir``), and writes ``config.json`` (the resolved config, the final DeepSpeed dict, world size and the
precision that runs) before any other file of the run; files are written whole or not at all
(``tagi_ds.files.atomic_write``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import random
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tagi_ds.config import ConfigError, TagiConfig
from tagi_ds.files import atomic_write
from tagi_ds.runtime import dist
from tagi_ds.runtime import engine as ds_engine


@dataclass(frozen=True)
class RunStart:
    """A run about to start, typed: what :func:`start` needs, built from the checked inputs (:meth:`of` for the
    command-line entry points, by hand for the others), never re-read from the command line.

    ``directory=True``: the output is a run directory (locked, ``config.json`` written first). ``False``: an
    artifact written whole by its own atomic rename (the PEFT export: ``files.atomic_dir``), so there is no lock
    to take and no ``config.json`` (its provenance file carries ``command``). ``process_group=False``: one process
    that needs no group (an export outside ZeRO-3)."""

    output_dir: Path
    stage: str  # config.json's "stage": pretrain, finetune, ..., evaluate, generate_adapter
    cfg: TagiConfig
    ds: dict[str, Any]  # the final DeepSpeed dict
    command: Mapping[str, str | None]  # the flags as given, as strings (config.json's "args")
    world_size: int | None = None  # what preflight saw in WORLD_SIZE (checked against the group), when known
    start_over: bool = False  # --start_over: set the previous run's checkpoints and metrics aside
    directory: bool = True
    process_group: bool = True

    @classmethod
    def of(cls, cfg: TagiConfig, ds: dict[str, Any], args, world_size: int | None = None) -> RunStart:
        """The run an entry point's parsed flags describe (``args.output_dir``, ``args.stage``, ``--start_over``)."""
        return cls(
            output_dir=Path(args.output_dir),
            stage=args.stage,
            cfg=cfg,
            ds=ds,
            command=command_record(args),
            world_size=world_size,
            start_over=bool(getattr(args, "start_over", False)),
        )


def command_record(args) -> dict[str, str | None]:
    """Parsed flags as config.json records them: each value as a string (None stays None)."""
    return {k: str(v) if v is not None else None for k, v in vars(args).items()}


def start(run: RunStart) -> Path:
    """Join the process group (one of ``run.world_size`` ranks, when given), seed, and for a run directory take
    its lock and write ``config.json``; returns ``run.output_dir``. A collective: every rank calls it."""
    # torch 2.13 deprecates the collectives DeepSpeed 0.19 calls; one warning per call floods the log.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if run.process_group:
        dist.init()
        if run.world_size is not None and dist.world_size() != run.world_size:
            raise RuntimeError(
                f"preflight saw WORLD_SIZE={run.world_size}, the process group has {dist.world_size()} ranks"
            )
    seed_everything(run.cfg.train.seed)
    out = run.output_dir
    if not run.directory:
        return out
    refusal = None
    if dist.is_main():
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock(out)
        except ConfigError as err:
            refusal = str(err)
        except OSError as err:
            refusal = f"--output_dir {out}: cannot create its lock file {out / LOCK} ({err.strerror})"
    refusal = dist.broadcast_object(refusal)
    if refusal:
        raise ConfigError(refusal)
    if run.start_over and dist.is_main():
        if moved := set_aside(out):
            print(f"--start_over: moved the previous run's {', '.join(moved)} to {out / moved[0]}", flush=True)
    write_config(run)
    from tagi_ds.runtime import watchdog

    watchdog.note_run_dir(out)
    return out


LOCK = ".tagi-run.lock"
_held: dict[Path, object] = {}  # run dir -> open lock file of this process (released at exit, or by unlock)


def lock(out: Path) -> None:
    """Hold an exclusive ``flock`` on ``OUTPUT_DIR/.tagi-run.lock`` for the life of this process (rank 0's): a
    second run into the same directory is refused in one line naming the holder. The kernel releases a flock when
    its process ends, however it ends, so a lock is never stale; the PID, host and start time written into the
    file only name the holder (and tell a holder on another host of a shared file system apart)."""
    key = out.resolve()
    if key in _held:
        return
    f = open(out / LOCK, "a+", encoding="utf-8")  # noqa: SIM115  (held open on purpose: the lock lives with it)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        if err.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise ConfigError(
            f"--output_dir {out}: another run is using it ({holder}); wait for it to end, or choose "
            "another --output_dir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _held[key] = f


def unlock(out: Path) -> None:
    """Release the lock :func:`lock` took (a driver that runs several stages in one process moves on)."""
    f = _held.pop(Path(out).resolve(), None)
    if f is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def holder(out: Path) -> str | None:
    """Who holds the lock on ``out`` (without taking it), or None: for the preflight's one line."""
    path = Path(out) / LOCK
    if not path.is_file() or Path(out).resolve() in _held:
        return None
    try:
        with path.open("r", encoding="utf-8", errors="replace") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return f.read().strip() or "another process"
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:
        return None
    return None


def set_aside(out: Path) -> list[str]:
    """``--start_over``: move the previous run's checkpoints and metrics into ``OUTPUT_DIR/replaced-<time>/`` (kept,
    not deleted: remove that folder yourself). Returns the folder's name and what went into it."""
    old = [name for name in ("checkpoints", "metrics.jsonl", "tensorboard") if (out / name).exists()]
    if not old:
        return []
    dest = out / time.strftime("replaced-%Y%m%d-%H%M%S")
    dest.mkdir()
    for name in old:
        shutil.move(str(out / name), str(dest / name))
    return [dest.name, *old]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_config(run: RunStart) -> None:
    """``config.json``, by rank 0; a failure to write it (a full or read-only disk) is one line on every rank's
    behalf and exit code 4, with no temp file left (``train.inject_fault=enospc@0`` tests it)."""
    from tagi_ds.runtime.preflight import WriteFailed

    out, cfg = run.output_dir, run.cfg
    error = None
    if dist.is_main():
        record = {
            "stage": run.stage,
            "world_size": dist.world_size(),
            "precision": ds_engine.precision(cfg),
            "tagi": cfg.to_dict(),
            "deepspeed": run.ds,
            "args": dict(run.command),
        }
        try:
            out.mkdir(parents=True, exist_ok=True)
            if code := {"enospc@0": errno.ENOSPC, "rofs@0": errno.EROFS}.get(getattr(cfg.train, "inject_fault", "")):
                raise OSError(code, os.strerror(code), str(out / "config.json"))
            atomic_write(out / "config.json", json.dumps(record, indent=2))
        except OSError as err:
            error = f"error: cannot write {err.filename or out / 'config.json'}: {err.strerror}; nothing was trained"
            print(error, file=sys.stderr, flush=True)
    if dist.broadcast_object(error):
        raise WriteFailed(error)
