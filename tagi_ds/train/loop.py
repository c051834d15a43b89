"""The one training loop, for all three stages: build, (resume), step, log, checkpoint, export.

Read top to bottom: it is the whole of what a launcher runs.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tagi_ds import artifacts, data
from tagi_ds.config import ConfigError, TagiConfig
from tagi_ds.model import build_model
from tagi_ds.train import checkpoint, dist
from tagi_ds.train import engine as ds_engine
from tagi_ds.train.guards import Guards
from tagi_ds.train.progress import Progress


@dataclass
class RunArgs:
    """What a launcher adds to the config: where things are, not how to train."""

    stage: str
    output_dir: Path
    deepspeed: str | None = None
    resume_from_checkpoint: str | None = None
    teachers: str | None = None  # finetune: teachers/ dir for KL + param alignment
    init_hypernet: str | None = None  # finetune: start from a pretrained hypernet/


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_config(out: Path, cfg: TagiConfig, ds: dict, args: RunArgs) -> None:
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        record = {"stage": args.stage, "world_size": dist.world_size(), "precision": ds_engine.precision(cfg),
                  "tagi": cfg.to_dict(), "deepspeed": ds,
                  "args": {k: str(v) if v is not None else None for k, v in vars(args).items()}}
        checkpoint.atomic_write_text(out / "config.json", json.dumps(record, indent=2))
    dist.barrier()


def run(cfg: TagiConfig, args: RunArgs) -> Path:
    """Train one stage; returns the final artifact directory (``hypernet/`` or ``teachers/``)."""
    # torch 2.13 deprecates the collectives DeepSpeed 0.19 calls; one warning per call floods the log.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    dist.init()
    seed_everything(cfg.train.seed)
    out = Path(args.output_dir)
    ds_json = ds_engine.load_ds_json(args.deepspeed or ds_engine.default_ds_config(cfg.recipe))
    ds = ds_engine.inject(ds_json, cfg, dist.world_size())
    resume = checkpoint.resolve(args.resume_from_checkpoint, out) if args.resume_from_checkpoint else None

    tokenizer = data.load_tokenizer(cfg)
    rows, num_rows, with_teacher = None, 0, False
    if args.stage == "teachers":
        rows = data.teacher_rows(data.load_tasks(cfg.data.spec, cfg.data, "train"), cfg.teacher.granularity)
        num_rows = len(rows)
    elif args.stage == "finetune" and cfg.mode == "tagi" and (cfg.loss.kl_weight > 0 or cfg.loss.param_weight > 0):
        if not args.teachers:
            raise ConfigError("finetune with loss.kl_weight or loss.param_weight > 0 needs --teachers DIR "
                              "(or --set loss.kl_weight=0 loss.param_weight=0)")
        rows, meta = artifacts.read_teacher_rows(Path(args.teachers))
        cfg.teacher.rank, cfg.teacher.alpha, cfg.teacher.granularity = meta["rank"], meta["alpha"], meta["granularity"]
        num_rows, with_teacher = len(rows), True
    write_config(out, cfg, ds, args)

    special = {"pad_id": tokenizer.pad_id, "eos_id": tokenizer.eos_id, "bos_id": tokenizer.bos_id}
    backbone = ds_engine.build_backbone(cfg, ds, special, training=True)
    model = build_model(cfg, args.stage, backbone, num_bank_rows=num_rows, with_teacher=with_teacher)
    if with_teacher:
        artifacts.load_teachers(model.teacher, Path(args.teachers), model)
    if args.init_hypernet:
        artifacts.load_hypernet(model, Path(args.init_hypernet))
    eng = ds_engine.build_engine(model, cfg, ds)
    device = eng.device

    loader = data.build_train_loader(cfg, tokenizer, stage=args.stage, rank=dist.rank(),
                                     world_size=dist.world_size(), teacher_rows=rows)
    start = 0
    if resume is not None:
        start, loader_state = checkpoint.load(eng, resume)
        loader.load_state_dict(loader_state)
    batches = iter(loader)

    guards = Guards(cfg.train.max_bad_steps, cfg.train.inject_fault)
    progress = Progress(out, args.stage, cfg.train.max_steps, start, cfg.train.tensorboard)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.trainable_parameters())  # full sizes
    progress.message(f"tagi-ds {args.stage}: recipe {cfg.recipe}, mode {cfg.mode}, {dist.world_size()} rank(s), "
                     f"ZeRO-{ds_engine.zero_stage(ds)}, precision {ds_engine.precision(cfg)}, device {device.type}, "
                     f"{trainable:,} trainable parameters"
                     + (f", resumed at step {start}" if start else ""))
    if layout := ds_engine.describe_partitioning(model, dist.world_size()):
        progress.message(layout)
    ckpt_dir = out / "checkpoints"
    step = start
    try:
        while step < cfg.train.max_steps:
            t0 = time.perf_counter()
            sums: dict[str, torch.Tensor] = {}
            tokens, bad = 0, False
            lr = eng.get_lr()[0]  # the rate this step uses (the scheduler advances in eng.step)
            for _ in range(cfg.train.grad_accum):
                batch = next(batches)
                # Counted on the host copy: reading the device's would wait for it (a sync per micro-step).
                tokens += int(batch.attention_mask.sum()) + batch.num_target_tokens()
                batch = batch.to(device)
                loss, terms = eng(batch)
                loss = guards.inject(step, loss)
                if guards.loss_is_bad(loss, step):  # same decision on every rank: nobody steps
                    bad = True
                    break
                eng.backward(loss)
                eng.step()
                for k, v in {"loss": loss, **terms}.items():  # device tensors, read once per logged step
                    sums[k] = sums.get(k, 0.0) + v.detach().double() / cfg.train.grad_accum
            if bad:
                eng.zero_grad()
            else:
                bad = guards.grad_norm_is_bad(eng.get_global_grad_norm())  # DeepSpeed skipped the update
            guards.record(bad, step + 1)
            step += 1
            if step % cfg.train.log_steps == 0 or step == cfg.train.max_steps:
                record = {"step": step, **_mean_over_ranks(sums, device),
                          "lr": lr, "grad_norm": _norm(eng.get_global_grad_norm()),
                          "tokens_per_s": tokens * dist.world_size() / (time.perf_counter() - t0),
                          "skipped_steps": guards.skipped}
                record.setdefault("loss", float("nan"))
                progress.log(record)
            signalled = guards.stop_requested()
            pause = signalled or (cfg.train.stop_after > 0 and step - start >= cfg.train.stop_after)
            if step % cfg.train.save_steps == 0 or pause or step == cfg.train.max_steps:
                checkpoint.save(eng, ckpt_dir, step, loader.state_dict(), cfg.train.keep_last)
            if pause and step < cfg.train.max_steps:
                why = "signal received" if signalled else f"train.stop_after={cfg.train.stop_after}"
                progress.message(f"{why}: saved step {step}, stopping (resume with --resume_from_checkpoint latest)")
                progress.close()
                return ckpt_dir / f"step-{step}"
    except BaseException:
        progress.close()
        raise
    progress.close()
    progress.message(f"data (rank 0): {loader.report()}")
    if args.stage == "teachers":
        final = out / "teachers"
        artifacts.save_teachers(model, final, rows, cfg.teacher.granularity)
    elif model.generator is not None:
        final = out / "hypernet"
        artifacts.save_hypernet(model, final)
    else:  # concat / no_instruction baselines: their shared LoRA is a one-row bank
        final = out / "baseline_lora"
        artifacts.save_teachers(model, final, {"*": 0}, "shared")
    progress.message(f"done: {final}")
    return final


def _mean_over_ranks(values: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """Every logged term averaged over ranks in one collective (same keys on every rank)."""
    if not values:
        return {}
    t = torch.stack([v.to(device, torch.float64) for v in values.values()])
    if not torch.distributed.is_initialized():
        return dict(zip(values, t.tolist()))
    torch.distributed.all_reduce(t)
    return {k: float(v) / dist.world_size() for k, v in zip(values, t.tolist())}


def _norm(value) -> float | None:
    return None if value is None else float(value)

