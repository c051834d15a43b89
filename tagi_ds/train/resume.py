"""Resume with changed settings: what differs from the checkpoint's config, what may differ, and making it apply.

A resume restores the optimizer, the LR scheduler, the RNG and every rank's data-loader position from the
checkpoint. Settings that only steer what happens next (lr and its schedule, weight decay, clipping, checkpoint and
log cadence, the loss weights) may change: :func:`compare` lists each one that differs (one line each) and
:func:`apply` makes the restored optimizer and scheduler use them. Settings that the restored state belongs to
cannot: the model's and the adapters' shapes, the stage, mode, world size and ZeRO stage, the data (its source, its
filters, the batch shape, the lengths) and the seed. A resume that changes one is refused in one line before
anything is written.

The seed is refused, not applied: the data order of an epoch is a permutation drawn from ``(train.seed, epoch)`` and
the loader resumes at a position inside it, so a new seed would re-draw the rest of the epoch around a position
that belongs to the old order (examples repeated or skipped), while the restored RNG streams keep the old seed's.
A new seed is a new run.

The checkpoint's config is the one its fingerprint records (``tagi_checkpoint.json``, ``config`` and
``zero_stage``); a checkpoint written before that is compared with its run directory's ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tagi_ds.config import RETIRED, TagiConfig
from tagi_ds.runtime import engine as ds_engine
from tagi_ds.runtime.preflight import fail, say_once
from tagi_ds.train import checkpoint

# Fields that may change on resume although their section may not: another implementation of the same weights.
ALLOWED = {
    "model.gradient_checkpointing",
    "model.adapter_impl",
    "model.attn_implementation",
    "hypernet.dropout",
    "hypernet.checkpoint_encoder",
}

# Why a field cannot change on resume: by exact name first, then by section. Anything not named is allowed.
_FIXED = {
    "recipe": "the model's shapes come from it",
    "mode": "the checkpoint trains another model",
    "train.seed": "the data order of the epoch the loader resumes inside, and the restored RNG streams, are the old "
    "seed's (a new seed is a new run)",
    "train.grad_accum": "the batch per optimizer step is part of the batch shape",
    "train.precision": "the optimizer state was saved for another precision",
    "train.frozen_backbone": "DeepSpeed's saved state is laid out for the other placement",
}
_FIXED_SECTIONS = {
    "model.": "the backbone and its adapted sites are the checkpoint's",
    "hypernet.": "the hypernetwork's shapes are the checkpoint's",
    "teacher.": "the teacher bank is the checkpoint's",
    "data.": "the data-loader position belongs to the old data source and batch shape",
}


def why_fixed(key: str) -> str | None:
    """Why ``key`` (a dotted config field) cannot change on resume, or None when it may."""
    if key in ALLOWED:
        return None
    if key in _FIXED:
        return _FIXED[key]
    return next((why for prefix, why in _FIXED_SECTIONS.items() if key.startswith(prefix)), None)


def record(cfg: TagiConfig, ds: dict) -> dict[str, Any]:
    """What a checkpoint's fingerprint records of the settings that wrote it."""
    return {"config": cfg.to_dict(), "zero_stage": ds_engine.zero_stage(ds)}


def saved_settings(path: Path) -> tuple[dict[str, Any], int | None, str] | None:
    """``(config, zero stage, where)`` of the checkpoint at ``path``: its fingerprint's, else its run directory's
    ``config.json`` (``OUTPUT_DIR/checkpoints/step-N`` -> ``OUTPUT_DIR``); None when neither records one."""
    try:
        finger = json.loads((path / checkpoint.FINGERPRINT).read_text(encoding="utf-8"))
        if isinstance(finger, dict) and isinstance(finger.get("config"), dict):
            return finger["config"], finger.get("zero_stage"), str(path / checkpoint.FINGERPRINT)
    except (OSError, ValueError):
        pass
    run_config = path.parent.parent / "config.json"
    try:
        data = json.loads(run_config.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("tagi"), dict):
            ds = data.get("deepspeed")
            return data["tagi"], ds_engine.zero_stage(ds) if isinstance(ds, dict) else None, str(run_config)
    except (OSError, ValueError):
        pass
    return None


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _shown(value: Any) -> str:
    return json.dumps(value)


def compare(path: Path, cfg: TagiConfig, ds: dict) -> list[str]:
    """Preflight of a resume from the checkpoint at ``path``: a field that cannot change is refused in one line
    (ConfigError, exit 2, nothing written yet); returns one line per field that differs and may (printed by rank 0
    as it is returned)."""
    saved = saved_settings(path)
    where = f"{checkpoint.FLAG} {path}"
    if saved is None:
        say_once(
            f"note: {where}: records no config (neither its {checkpoint.FINGERPRINT} nor a config.json beside "
            "its checkpoints/); the settings are not compared with the checkpoint's"
        )
        return []
    theirs, their_stage, source = saved
    mine = _flat(cfg.to_dict())
    theirs = {k: v for k, v in _flat(theirs).items() if k not in RETIRED}  # an old checkpoint's dropped keys
    differ = [k for k in [*mine, *(k for k in theirs if k not in mine)] if mine.get(k) != theirs.get(k)]
    refused = [k for k in differ if why_fixed(k)]
    if their_stage is not None and their_stage != ds_engine.zero_stage(ds):
        refused.insert(0, "deepspeed.zero_optimization.stage")
        theirs["deepspeed.zero_optimization.stage"] = their_stage
        mine["deepspeed.zero_optimization.stage"] = ds_engine.zero_stage(ds)
    if refused:
        key = refused[0]
        why = why_fixed(key) or "DeepSpeed's saved state is laid out for the other ZeRO stage"
        more = f" (also {', '.join(refused[1:])})" if refused[1:] else ""
        fail(
            where,
            f"{key} cannot change on resume: the checkpoint has {_shown(theirs.get(key))}, this run "
            f"{_shown(mine.get(key))}{more}; {why}. Resume with the checkpoint's settings ({source}), or start a "
            "fresh run (another --output_dir, or --start_over)",
        )
    lines = [
        f"note: resume changes {k}: {_shown(theirs.get(k))} in the checkpoint, {_shown(mine.get(k))} now"
        for k in differ
    ]
    for line in lines:
        say_once(line)
    return lines


def apply(eng, cfg: TagiConfig) -> None:
    """After DeepSpeed restored the optimizer and the scheduler: this run's lr, schedule and weight decay, not the
    checkpoint's. ``load_state_dict`` puts back the saved param groups (lr, initial_lr, weight_decay) and the
    scheduler's ``base_lrs``, so a new ``train.lr`` would otherwise be ignored while config.json records it. The
    lr of the current step is recomputed as LambdaLR computes it (``base_lr * lambda(last_epoch)``): unchanged
    settings give the same float, and a resume stays bit-exact."""
    sched = eng.lr_scheduler
    groups = eng.optimizer.param_groups
    schedule = ds_engine.lr_lambda(cfg)
    for g in groups:
        g["initial_lr"] = cfg.train.lr
        g["weight_decay"] = cfg.train.weight_decay
    if sched is None:
        return
    sched.base_lrs = [cfg.train.lr for _ in groups]
    sched.lr_lambdas = [schedule for _ in groups]
    lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    for g, lr in zip(groups, lrs):
        g["lr"] = lr
    sched._last_lr = lrs
