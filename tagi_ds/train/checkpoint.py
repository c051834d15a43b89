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

import errno
import io
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tagi_ds.config import ConfigError
from tagi_ds.files import atomic_write, read_json, replace_dir
from tagi_ds.runtime import dist
from tagi_ds.runtime.preflight import WriteFailed, check_zip, fail, say_once

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


class SaveFailed(WriteFailed):
    """A checkpoint could not be written: the run ends with one line (already printed), the previous complete
    checkpoint and ``latest`` untouched, nothing of this save left behind."""


def save(
    engine,
    ckpt_dir: Path,
    step: int,
    loader_state: dict[str, Any],
    keep_last: int,
    fingerprint: dict[str, Any] | None = None,
    fault: tuple[int, int] | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    A failure to write (a full or read-only disk) raises :class:`SaveFailed` on every rank after rank 0 has
    printed one line; ``tmp`` is removed and ``latest`` still names the previous complete checkpoint. The space
    check and the ``tmp`` directory come first, agreed by all ranks, so that a disk that is full or read-only
    before the save fails before DeepSpeed writes (a rank that fails inside DeepSpeed's own collectives would
    leave its peers waiting). ``fault``: ``(step, errno)`` of ``train.inject_fault=enospc@STEP`` / ``rofs@STEP``."""
    tag, tmp_tag = _tag(step), f"{_tag(step)}.tmp"
    final, tmp = ckpt_dir / tag, ckpt_dir / tmp_tag
    error = None
    if dist.is_main():
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a run killed mid-save
            _check_space(ckpt_dir, step)
            tmp.mkdir()
        except OSError as err:
            error = _describe(err, tmp)
    _agree(error, ckpt_dir, tmp, step)
    try:
        engine.save_checkpoint(
            str(ckpt_dir), tag=tmp_tag, client_state={"step": step}, save_latest=False, exclude_frozen_parameters=True
        )
        mine = tmp / f"trainer_rank{dist.rank()}.pt"
        if fault is not None and fault[0] == step:
            raise OSError(fault[1], os.strerror(fault[1]), str(mine))
        state = io.BytesIO()  # a few kB (loader position, RNG states): serialised here, written by the one writer
        torch.save({"step": step, "loader": loader_state, "rng": rng_state(), "world_size": dist.world_size()}, state)
        atomic_write(mine, state.getvalue())
    except (OSError, RuntimeError) as err:  # torch.save: RuntimeError "Parent directory ... does not exist"
        error = _describe(err, tmp)
    _agree(error, ckpt_dir, tmp, step)  # every rank's files are in tmp/
    if dist.is_main():
        try:
            if fingerprint is not None:
                atomic_write(
                    tmp / FINGERPRINT, json.dumps({**fingerprint, "step": step, "files": _manifest(tmp)}, indent=1)
                )
            replace_dir(tmp, final)
            atomic_write(ckpt_dir / LATEST, tag + "\n")
        except OSError as err:
            error = _describe(err, tmp)
    _agree(error, ckpt_dir, tmp, step)
    if dist.is_main():
        _prune(ckpt_dir, keep_last, step, (fingerprint or {}).get("run_id"))
    dist.barrier()
    return final


SPACE_MARGIN = 1.2  # a save needs the size of the previous one; a little more for DeepSpeed's scripts


def _check_space(ckpt_dir: Path, step: int) -> None:
    """Refuse a save that will not fit: the size of the newest complete checkpoint (all of one is the same size)
    against the free space. The first save has no size to compare with and goes ahead."""
    prev = newest_complete(ckpt_dir)
    if prev is None:
        return
    need = int(sum(f.stat().st_size for f in prev.iterdir() if f.is_file()) * SPACE_MARGIN)
    free = shutil.disk_usage(ckpt_dir).free
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"{os.strerror(errno.ENOSPC)}: step {step} needs about {_mb(need)}, {_mb(free)} free",
            str(ckpt_dir / f"{_tag(step)}.tmp"),
        )


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _describe(err: BaseException, tmp: Path) -> str:
    if isinstance(err, OSError):
        where = err.filename or tmp
        return f"cannot write {where}: {err.strerror or err}"
    return f"cannot write {tmp}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"


def _agree(error: str | None, ckpt_dir: Path, tmp: Path, step: int) -> None:
    """Every rank learns whether any rank failed to write (one collective); on a failure rank 0 removes this
    save's ``tmp``, prints the one line, and every rank raises :class:`SaveFailed`."""
    errors = dist.gather_object(error)
    failed = dist.any_rank(error is not None)
    if not failed:
        return
    message = ""
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        rank, what = next((r, e) for r, e in enumerate(errors) if e is not None)
        last = newest_complete(ckpt_dir)
        out = ckpt_dir.parent
        message = (
            f"error: saving step {step} failed: {what}"
            + (f" (rank {rank})" if dist.world_size() > 1 else "")
            + f"; {resume_hint(last, out)}"
        )
        print(message, file=sys.stderr, flush=True)
    dist.barrier()  # rank 0 has printed before any rank exits (the launcher ends the job at the first)
    raise SaveFailed(message)


def resume_hint(last: Path | None, out: Path) -> str:
    """The tail of a fault's one line: the last complete checkpoint and how to resume from it."""
    if last is None:
        return "no complete checkpoint yet: start again without --resume_from_checkpoint"
    return (
        f"last complete checkpoint {last}; free space or fix the directory, then resume with the same command "
        f"and --resume_from_checkpoint latest"
    )


def _manifest(path: Path) -> dict[str, int]:
    """``{file: size}`` of a checkpoint, recorded in its fingerprint: a checkpoint is complete when all are there."""
    return {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file() and f.name != FINGERPRINT}


def _prune(ckpt_dir: Path, keep_last: int, step: int, run_id: str | None) -> None:
    """Keep the ``keep_last`` newest checkpoints this run wrote up to ``step`` (the one just written among them).
    A checkpoint of another run (or of none: written before run ids) is never removed, and neither is a higher
    step of this run's own abandoned future (a resume from an older checkpoint rewrites those as it reaches them)."""
    if keep_last <= 0 or run_id is None:
        return
    ours = []
    for p in ckpt_dir.glob("step-*"):
        n = p.name.split("-", 1)[1]
        if not n.isdigit() or int(n) > step or not p.is_dir():
            continue
        try:
            if json.loads((p / FINGERPRINT).read_text(encoding="utf-8")).get("run_id") == run_id:
                ours.append((int(n), p))
        except (OSError, ValueError, AttributeError):
            continue
    for _, p in sorted(ours)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def steps_in(ckpt_dir: Path) -> list[Path]:
    """The ``step-N`` directories under ``ckpt_dir``, newest first (``step-N.tmp`` excluded)."""
    found = [(int(p.name[5:]), p) for p in ckpt_dir.glob("step-*") if p.name[5:].isdigit() and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def incomplete(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed (a file missing or of the wrong size), or None."""
    if not path.is_dir():
        return "no such checkpoint directory"
    if path.name.endswith(".tmp"):
        return "an incomplete checkpoint (a save that never finished)"
    try:
        finger = json.loads((path / FINGERPRINT).read_text(encoding="utf-8"))
    except FileNotFoundError:
        finger = None  # written before fingerprints: DeepSpeed's and the trainer's files are all there is
    except (OSError, ValueError):
        return f"{FINGERPRINT} is damaged"
    ranks = list(path.glob("trainer_rank*.pt"))
    if not ranks:
        return "no trainer_rank*.pt"
    files = finger.get("files") if isinstance(finger, dict) else None
    if isinstance(files, dict):
        for name, size in files.items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} is damaged (truncated: {f.stat().st_size} bytes, {size} were written)"
        return None
    world = len(ranks)
    for r in range(world):
        if not list(path.glob(f"*zero_pp_rank_{r}_*model_states.pt")):
            return f"no DeepSpeed model-state file for rank {r}"
        if not list(path.glob(f"*zero_pp_rank_{r}_*optim_states.pt")):
            return f"no DeepSpeed optimizer file for rank {r}"
    return None


def newest_complete(ckpt_dir: Path) -> Path | None:
    return next((p for p in steps_in(ckpt_dir) if incomplete(p) is None), None)


def _read_latest(pointer: Path) -> tuple[str | None, str | None]:
    """``(tag, problem)``: what a ``latest`` file names, or why it names nothing usable."""
    try:
        tag = pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, "is not UTF-8 text"
    except OSError as err:
        return None, f"cannot be read ({err.strerror})"
    if not tag or "/" in tag or tag in (".", ".."):
        return None, f"does not name a checkpoint ({tag!r})"
    return tag, None


def run_id(path: Path) -> str | None:
    """The run that wrote the checkpoint at ``path`` (None: written before run ids, or unreadable)."""
    try:
        return json.loads((path / FINGERPRINT).read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def refuse_previous_run(output_dir: Path) -> None:
    """Preflight of a fresh run (no ``--resume_from_checkpoint``, no ``--start_over``): ``output_dir`` must not hold
    another run's checkpoints. Its pruning would otherwise keep the old run's higher steps and delete each new one."""
    ckpt_dir = output_dir / "checkpoints"
    found = [p.name for p in ckpt_dir.glob("step-*")] if ckpt_dir.is_dir() else []
    if found or (ckpt_dir / LATEST).exists():
        newest = newest_complete(ckpt_dir)
        held = f"newest complete {newest.name}" if newest else f"{len(found)} incomplete"
        fail(
            f"--output_dir {output_dir}",
            f"holds another run's checkpoints ({held}); resume it with {FLAG} latest, "
            "or pass --start_over to move them aside (into OUTPUT_DIR/replaced-<time>/), or choose another "
            "--output_dir",
        )


def resolve(spec: str, output_dir: Path) -> Path:
    """``latest`` (in ``output_dir/checkpoints``), a ``step-N`` dir, or a checkpoints dir with a latest file.

    ``latest`` resumes from the newest *complete* checkpoint: the one the ``latest`` file names when it is
    complete, else (a damaged file, a step that is gone or incomplete) the newest complete ``step-N``, with a
    note saying so. A damaged checkpoint named by path is one line that names the newest complete one."""
    ckpt_dir = output_dir / "checkpoints"
    if spec == LATEST:
        pointer = ckpt_dir / LATEST
        newest = newest_complete(ckpt_dir)
        if not pointer.is_file() and newest is None:
            fail(
                f"{FLAG} latest",
                f"no complete checkpoint in {ckpt_dir} (no 'latest' file); start without {FLAG}",
                str(output_dir),
            )
        tag, problem = _read_latest(pointer) if pointer.is_file() else (None, "is missing")
        if tag is not None:
            problem = incomplete(ckpt_dir / tag)
            problem = problem and f"names {tag}: {problem}"
        if problem is None:
            return ckpt_dir / tag
        if newest is None:
            fail(
                f"{FLAG} latest",
                f"{pointer} {problem}, and no other complete checkpoint is in {ckpt_dir}; start without {FLAG}",
                str(output_dir),
            )
        say_once(f"note: {pointer} {problem}; resuming from {newest.name}, the newest complete checkpoint")
        return newest
    path = Path(spec)
    if (path / LATEST).is_file():
        tag, problem = _read_latest(path / LATEST)
        if problem:
            newest = newest_complete(path)
            fail(
                f"{FLAG} {spec}",
                f"its 'latest' file {problem}; "
                + (
                    f"the newest complete checkpoint is {newest}: pass that"
                    if newest
                    else "and it holds no complete checkpoint"
                ),
            )
        path = path / tag
    problem = incomplete(path)
    if problem is not None:
        newest = newest_complete(path.parent)
        fail(
            f"{FLAG} {spec}",
            f"not a complete tagi-ds checkpoint: {problem}; "
            + (
                f"the newest complete checkpoint is {newest}: pass that or 'latest'"
                if newest
                else "no complete checkpoint is beside it"
            ),
            path,
        )
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
                hint = (
                    "resume with as many ranks as wrote it"
                    if key == "world_size"
                    else f"resume it with stage/recipe/mode {saved['stage']}/{saved['recipe']}/{saved['mode']}"
                )
                fail(where, f"written with {key} {saved[key]}, this run has {expected[key]}; {hint}", saved[key])
        mine, theirs = expected["trainable"], saved["trainable"]
        if mine != theirs:
            name = next((n for n in [*mine, *theirs] if mine.get(n) != theirs.get(n)), "?")
            fail(
                where,
                f"trainable parameter {name} differs (saved {theirs.get(name)}, this run {mine.get(name)}); "
                "resume with the settings that wrote it",
                f"{len(theirs)} saved, {len(mine)} here",
            )
    ranks = sorted(path.glob("trainer_rank*.pt"))
    if len(ranks) != world:
        fail(
            where,
            f"written by {len(ranks)} ranks, this run has {world}; resume with as many ranks as wrote it",
            len(ranks),
        )
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
            fail(
                where,
                f"written by {state['world_size']} ranks, this run has {world}; resume with as many ranks as wrote it",
                state["world_size"],
            )
    for f in sorted(path.glob("*.pt")):
        check_zip(f, where)
    return path


def load(engine, path: Path) -> tuple[int, dict[str, Any]]:
    """Restore engine (hypernet/bank, optimizer, scheduler) and this rank's RNG; return (step, loader state)."""
    mine = path / f"trainer_rank{dist.rank()}.pt"
    if not mine.is_file():
        raise ConfigError(
            f"--resume_from_checkpoint {str(path)!r}: no {mine.name}; it was written by a run "
            f"with fewer ranks than this one ({dist.world_size()})"
        )
    state = torch.load(mine, weights_only=False)
    if state["world_size"] != dist.world_size():
        raise ConfigError(
            f"--resume_from_checkpoint {str(path)!r}: written by {state['world_size']} ranks, "
            f"resumed with {dist.world_size()}; resume with the same world size"
        )
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False)
    if load_path is None:
        raise ConfigError(f"--resume_from_checkpoint {str(path)!r}: DeepSpeed could not load it")
    set_rng_state(state["rng"])
    return int(state["step"]), state["loader"]
