"""Engine checkpoints that are either complete or invisible.

Layout under ``OUTPUT_DIR/checkpoints``: ``step-N/`` (DeepSpeed's files for the trainable state, without
the frozen backbone, plus ``trainer_rank{r}.pt`` with each rank's data-loader position and RNG state) and
``latest`` (a one-line file naming the newest complete ``step-N``). A checkpoint is written as
``step-N.tmp/``, renamed to ``step-N/`` once every rank has finished, and only then is ``latest``
replaced (temp file + rename). A run killed at any moment leaves ``latest`` on a complete checkpoint.

``tagi_checkpoint.json`` in each checkpoint is its fingerprint: stage, recipe, mode, world size and the
trainable parameters' names and shapes. :func:`check` (preflight, before any process group) resolves a
``--resume_from_checkpoint`` spec, compares the fingerprint with the run's and opens every file the resume
will read, so that a foreign, partial or truncated checkpoint is one line and exit code 2, not a gloo error.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tagi_ds.config import ConfigError
from tagi_ds.runtime import dist
from tagi_ds.runtime.preflight import check_zip, fail, read_json
from tagi_ds.runtime.rundir import atomic_write_text

LATEST = "latest"
FINGERPRINT = "tagi_checkpoint.json"
FLAG = "--resume_from_checkpoint"


def _tag(step: int) -> str:
    return f"step-{step}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fingerprint(stage: str, cfg, world_size: int, model) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed by a run: ``model`` may be the meta-device model."""
    trainable = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters() if p.requires_grad}
    return {"stage": stage, "recipe": cfg.recipe, "mode": cfg.mode, "world_size": world_size, "trainable": trainable}


def save(engine, ckpt_dir: Path, step: int, loader_state: dict[str, Any], keep_last: int,
         fingerprint: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    tag, tmp_tag = _tag(step), f"{_tag(step)}.tmp"
    final, tmp = ckpt_dir / tag, ckpt_dir / tmp_tag
    if dist.is_main():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a run killed mid-save
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state={"step": step}, save_latest=False,
                           exclude_frozen_parameters=True)
    mine = tmp / f"trainer_rank{dist.rank()}.pt"
    part = mine.with_name(mine.name + ".part")
    torch.save({"step": step, "loader": loader_state, "rng": rng_state(), "world_size": dist.world_size()}, part)
    os.replace(part, mine)
    dist.barrier()  # every rank's files are in tmp/
    if dist.is_main():
        if fingerprint is not None:
            atomic_write_text(tmp / FINGERPRINT, json.dumps({**fingerprint, "step": step}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(ckpt_dir / LATEST, tag + "\n")
        _prune(ckpt_dir, keep_last)
    dist.barrier()
    return final


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    steps = sorted((int(p.name.split("-")[1]), p) for p in ckpt_dir.glob("step-*") if p.name.split("-")[1].isdigit())
    for _, p in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def resolve(spec: str, output_dir: Path) -> Path:
    """``latest`` (in ``output_dir/checkpoints``), a ``step-N`` dir, or a checkpoints dir with a latest file."""
    ckpt_dir = output_dir / "checkpoints"
    if spec == LATEST:
        pointer = ckpt_dir / LATEST
        if not pointer.is_file():
            fail(f"{FLAG} latest", f"no complete checkpoint in {ckpt_dir} (no 'latest' file); start without "
                 f"{FLAG}", str(output_dir))
        path = ckpt_dir / pointer.read_text(encoding="utf-8").strip()
    else:
        path = Path(spec)
        if (path / LATEST).is_file():
            path = path / (path / LATEST).read_text(encoding="utf-8").strip()
    if path.name.endswith(".tmp"):
        fail(f"{FLAG} {spec}", "an incomplete checkpoint (a save that never finished); use its 'latest'", path)
    if not path.is_dir() or not any(path.glob("trainer_rank*.pt")):
        fail(f"{FLAG} {spec}", "not a complete tagi-ds checkpoint (no step-N dir with trainer_rank*.pt)", path)
    return path


def check(spec: str, output_dir: Path, expected: dict[str, Any]) -> Path:
    """Preflight of a resume: the checkpoint ``spec`` names, its fingerprint against ``expected`` (this run's),
    and every file the resume reads (each rank's ``trainer_rank{r}.pt``, DeepSpeed's ``*.pt``) whole."""
    path = resolve(spec, output_dir)
    where = f"{FLAG} {path}"
    world = expected["world_size"]
    if (path / FINGERPRINT).is_file():
        saved = read_json(path / FINGERPRINT, f"{where}/{FINGERPRINT}", tuple(expected))
        for key in ("stage", "recipe", "mode", "world_size"):
            if saved[key] != expected[key]:
                hint = ("resume with as many ranks as wrote it" if key == "world_size" else
                        f"resume it with stage/recipe/mode {saved['stage']}/{saved['recipe']}/{saved['mode']}")
                fail(where, f"written with {key} {saved[key]}, this run has {expected[key]}; {hint}", saved[key])
        mine, theirs = expected["trainable"], saved["trainable"]
        if mine != theirs:
            name = next((n for n in [*mine, *theirs] if mine.get(n) != theirs.get(n)), "?")
            fail(where, f"trainable parameter {name} differs (saved {theirs.get(name)}, this run {mine.get(name)}); "
                 "resume with the settings that wrote it", f"{len(theirs)} saved, {len(mine)} here")
    ranks = sorted(path.glob("trainer_rank*.pt"))
    if len(ranks) != world:
        fail(where, f"written by {len(ranks)} ranks, this run has {world}; resume with as many ranks as wrote it",
             len(ranks))
    for r in range(world):
        mine_file = path / f"trainer_rank{r}.pt"
        if not mine_file.is_file():
            fail(where, f"no {mine_file.name}")
        try:
            state = torch.load(mine_file, weights_only=False)
            keys_ok = isinstance(state, dict) and {"step", "loader", "rng", "world_size"} <= set(state)
        except Exception as err:  # noqa: BLE001  (torch.load raises many kinds on a damaged file)
            fail(where, f"{mine_file.name} is damaged ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
        if not keys_ok:
            fail(where, f"{mine_file.name} is not a tagi-ds trainer state")
        if state["world_size"] != world:
            fail(where, f"written by {state['world_size']} ranks, this run has {world}; resume with as many ranks "
                 "as wrote it", state["world_size"])
    for f in sorted(path.glob("*.pt")):
        check_zip(f, where)
    return path


def load(engine, path: Path) -> tuple[int, dict[str, Any]]:
    """Restore engine (hypernet/bank, optimizer, scheduler) and this rank's RNG; return (step, loader state)."""
    mine = path / f"trainer_rank{dist.rank()}.pt"
    if not mine.is_file():
        raise ConfigError(f"--resume_from_checkpoint {str(path)!r}: no {mine.name}; it was written by a run "
                          f"with fewer ranks than this one ({dist.world_size()})")
    state = torch.load(mine, weights_only=False)
    if state["world_size"] != dist.world_size():
        raise ConfigError(f"--resume_from_checkpoint {str(path)!r}: written by {state['world_size']} ranks, "
                          f"resumed with {dist.world_size()}; resume with the same world size")
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False)
    if load_path is None:
        raise ConfigError(f"--resume_from_checkpoint {str(path)!r}: DeepSpeed could not load it")
    set_rng_state(state["rng"])
    return int(state["step"]), state["loader"]
