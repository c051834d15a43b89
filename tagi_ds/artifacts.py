"""Final artifacts: ``hypernet/`` and ``teachers/`` (safetensors + JSON), written atomically.

``hypernet/``: ``generator.safetensors`` + ``config.json`` (the resolved TagiConfig and the site list).
``teachers/``: ``teachers.safetensors`` (``A.<site>`` ``[N, r, d_in]``, ``B.<site>`` ``[N, d_out, r]``),
``rows.json`` (task or category name -> row) and ``config.json``.
Under ZeRO-3 the parameters are gathered (a collective: every rank calls save_*), rank 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tagi_ds.config import ConfigError, TagiConfig, from_dict
from tagi_ds.train import dist


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter]):
    """Full parameter values on every rank for the duration (a no-op without ZeRO-3)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def _write_dir(final: Path, files: dict[str, Any]) -> None:
    """Write ``files`` (name -> dict of tensors | JSON object) into ``final`` via a temp dir + rename."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, content in files.items():
        if name.endswith(".safetensors"):
            save_file({k: v.detach().cpu().contiguous() for k, v in content.items()}, str(tmp / name))
        else:
            (tmp / name).write_text(json.dumps(content, indent=2), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _sites_meta(model) -> list[dict[str, Any]]:
    return [dataclasses.asdict(s) for s in model.sites]


def save_hypernet(model, path: Path) -> None:
    params = list(model.generator.parameters())
    with gathered(params):
        if dist.is_main():
            tensors = {k: v.float() for k, v in model.generator.state_dict().items()}
            _write_dir(path, {"generator.safetensors": tensors,
                              "config.json": {"tagi": model.cfg.to_dict(), "sites": _sites_meta(model)}})
    dist.barrier()


def read_config(path: Path) -> TagiConfig:
    f = path / "config.json"
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
        return from_dict(meta["tagi"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as err:
        raise ConfigError(f"{f}: not a tagi-ds artifact config ({type(err).__name__}: {err})") from err


def _check_sites(path: Path, model) -> None:
    meta = json.loads((path / "config.json").read_text(encoding="utf-8"))
    saved = [(s["name"], s["d_in"], s["d_out"]) for s in meta["sites"]]
    mine = [(s.name, s.d_in, s.d_out) for s in model.sites]
    if saved != mine:
        first = next((a, b) for a, b in zip(saved + [None] * len(mine), mine + [None] * len(saved)) if a != b)
        raise ConfigError(f"{path / 'config.json'}: adapted sites differ from this model's "
                          f"(saved {first[0]}, here {first[1]}); use the same recipe and model.adapted")


def load_hypernet(model, path: Path) -> None:
    """Load generator weights (before the engine is built). Sites and shapes must match."""
    f = Path(path) / "generator.safetensors"
    if not f.is_file():
        raise ConfigError(f"--init_hypernet/--hypernet {str(path)!r}: no generator.safetensors (a hypernet/ dir "
                          "written by pretrain.py or finetune.py is expected)")
    _check_sites(Path(path), model)
    state = load_file(str(f))
    mine = model.generator.state_dict()
    for key, want in mine.items():  # in module order, so the first mismatch named is the first one built
        if key in state and tuple(state[key].shape) != tuple(want.shape):
            raise ConfigError(f"{f}: generator tensor {key} has shape {tuple(state[key].shape)}, this model's "
                              f"{tuple(want.shape)}; use the same hypernet.* settings (rank, hidden, ...)")
    missing, unexpected = model.generator.load_state_dict(state, strict=False)
    if missing == ["marker.vector"] and not unexpected:
        # A hypernet saved without hypernet.fusion_marker: the marker is set to zero, which is exactly fusion
        # without a marker, so the loaded model computes what the saved one did (and finetuning may train it).
        with torch.no_grad():
            model.generator.marker.vector.zero_()
        if dist.is_main():
            print(f"{f}: no fusion marker saved; it starts at zero (identical to fusion without a marker)",
                  flush=True)
        return
    if missing or unexpected:
        raise ConfigError(f"{f}: generator keys differ (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                          "use the same hypernet.* settings")


def save_teachers(model, path: Path, rows: dict[str, int], granularity: str) -> None:
    bank = model.bank
    params = list(bank.parameters())
    with gathered(params):
        if dist.is_main():
            tensors = {f"A.{k}": v.float() for k, v in bank.A.items()}
            tensors.update({f"B.{k}": v.float() for k, v in bank.B.items()})
            _write_dir(path, {"teachers.safetensors": tensors, "rows.json": rows,
                              "config.json": {"tagi": model.cfg.to_dict(), "sites": _sites_meta(model),
                                              "rank": bank.rank, "alpha": bank.alpha, "granularity": granularity}})
    dist.barrier()


def read_teacher_rows(path: Path) -> tuple[dict[str, int], dict[str, Any]]:
    path = Path(path)
    try:
        rows = json.loads((path / "rows.json").read_text(encoding="utf-8"))
        meta = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError) as err:
        raise ConfigError(f"--teachers {str(path)!r}: not a teachers/ dir written by train_teachers.py "
                          f"({err})") from err
    return rows, meta


def load_teachers(bank, path: Path, model) -> None:
    """Copy saved teacher factors into ``bank`` (before the engine is built)."""
    path = Path(path)
    _check_sites(path, model)
    state = load_file(str(path / "teachers.safetensors"))
    with torch.no_grad():
        for k in bank.A:
            a, b = state[f"A.{k}"], state[f"B.{k}"]
            if a.shape != bank.A[k].shape:
                raise ConfigError(f"--teachers {str(path)!r}: teacher A.{k} has shape {tuple(a.shape)}, this run "
                                  f"expects {tuple(bank.A[k].shape)} (teacher.rank / number of rows differ)")
            bank.A[k].copy_(a)
            bank.B[k].copy_(b)
