"""Where the frozen backbone lives under ZeRO-3: ``replicated`` (whole on every GPU, outside ZeRO) where it fits,
``partitioned`` (ZeRO-3 owns it: 1/W per rank, gathered module by module) where it does not.

A frozen backbone has no gradients and no optimizer state: ZeRO-3 only saves its weights' memory, 1 - 1/W of them
per GPU, and pays for it at every step: every module's weights are all-gathered before and released after each of
its calls (instruction encoding, student and teacher forwards, backward), each call through Python hooks on the
host. When the whole backbone fits next to everything else, keeping it replicated removes that work and keeps the
rest of ZeRO-3 (the hypernetwork's gradients and optimizer state stay partitioned).

``choose`` decides for a plan (``--backbone auto``: replicated when its memory ``total`` fits the usable memory,
``gpu_memory.usable_bytes``); ``for_run`` asks the same question for a training run's config on this machine's
GPU, and ``for_training`` decides for a training run (``train.frozen_backbone``), which
``tagi_ds.assembly.assemble`` then builds (``runtime.engine.Placement``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from tagi_ds import loss_terms, stages
from tagi_ds.config import ConfigError
from tagi_ds.plan.gpu_memory import memory, usable_bytes
from tagi_ds.plan.inputs import GiB, PlanInput
from tagi_ds.plan.shapes import Counts, Shapes
from tagi_ds.runtime import engine as E


def choose(p: PlanInput, c: Counts, s: Shapes, zero: dict[str, Any]) -> dict[str, Any]:
    """``{"placement": replicated | partitioned | whole, "why": ...}`` for ``p`` (``whole``: not ZeRO-3)."""
    if p.stage != "z3":
        return {"placement": "whole", "why": f"stage {p.stage}: the backbone is whole on every GPU anyway"}
    if p.backbone != "auto":
        return {"placement": p.backbone, "why": f"--backbone {p.backbone}"}
    if p.offload == "param":
        return {"placement": "partitioned", "why": "--offload param keeps parameters off the GPU"}
    need = memory(dataclasses.replace(p, backbone="replicated"), c, s, zero)["total"]
    usable = usable_bytes(p.gpu_mem_gb)
    if need <= usable:
        return {
            "placement": "replicated",
            "why": f"fits whole: {need / GiB:.1f} of {usable / GiB:.1f} GiB usable per GPU",
        }
    return {
        "placement": "partitioned",
        "why": f"replicated would need {need / GiB:.1f} of {usable / GiB:.1f} GiB usable per GPU",
    }


def for_run(
    cfg, zero: dict[str, Any], world: int, gpu_mem_bytes: int, precision: str, teacher_cfg=None
) -> dict[str, Any]:
    """``choose`` for a training run: ``cfg``'s shapes (its own sizes and ``--set`` overrides, not a recipe's),
    micro-batch, precision and checkpointing, on ``world`` GPUs of ``gpu_mem_bytes`` each; ``teacher_cfg``: a
    separate teacher model's config (``--teacher_model``), whose partitioned weights and forward count too."""
    import dataclasses

    from tagi_ds.plan.shapes import count

    teacher = stages.MODES[cfg.mode].instruction and loss_terms.wants_teacher(cfg.loss)
    offload = zero.get("offload_param", {}).get("device", "none") not in (None, "none")
    p = PlanInput(
        model=cfg.recipe,
        nodes=1,
        gpus_per_node=world,
        gpu_mem_gb=gpu_mem_bytes / GiB,
        stage="z3",
        offload="param" if offload else "none",
        micro_batch=cfg.data.tasks_per_batch * cfg.data.examples_per_task,
        examples_per_task=cfg.data.examples_per_task,
        seq_len=cfg.data.max_source_length,
        target_len=cfg.data.max_target_length,
        instr_len=cfg.data.max_instruction_length,
        rank=cfg.hypernet.rank,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        precision="bf16" if precision in ("bf16", "fp16") else "fp32",
        kl=teacher or teacher_cfg is not None,
        terms=tuple(t.name for t in loss_terms.active(cfg.loss, teacher or teacher_cfg is not None)),
        backbone=cfg.train.frozen_backbone,
    )
    threshold = int(zero.get("stage3_param_persistence_threshold", 100_000))
    c = count(cfg, teacher_rows=1, persistence_threshold=threshold)
    if teacher_cfg is not None:
        c = dataclasses.replace(c, teacher_model=count(teacher_cfg, 0, threshold))
    s = Shapes(p.micro_batch, cfg.data.tasks_per_batch, p.seq_len, p.target_len, p.instr_len)
    return choose(p, c, s, zero)


def for_training(cfg, ds: dict[str, Any], world_size: int, teacher_cfg=None) -> E.Placement:
    """Where a training run keeps its frozen backbone, and why: ``whole`` (below ZeRO-3 every rank holds it anyway),
    ``replicated`` (ZeRO-3: whole on every rank, outside ZeRO: no all-gathers, no module hooks; the hypernetwork's
    gradients and optimizer state stay partitioned) or ``partitioned`` (ZeRO-3 owns it, 1/W per rank).

    ``train.frozen_backbone=replicated|partitioned`` decides (replicated needs a frozen backbone and no parameter
    offload). ``auto``: partitioned when a parameter is unfrozen (``model.trainable``) or offloaded; on CUDA,
    replicated when ``for_run`` says it fits this GPU next to everything else, else partitioned; on a CPU,
    partitioned (CPU runs are how ZeRO-3 partitioning is exercised at tiny scale: the tests and the quickstart).
    """
    choice, zero = cfg.train.frozen_backbone, ds.get("zero_optimization", {})
    if E.zero_stage(ds) != 3:
        return E.Placement("whole", f"ZeRO-{E.zero_stage(ds)}: every rank holds the frozen backbone")
    offload = zero.get("offload_param", {}).get("device", "none") not in (None, "none")
    if choice == "replicated" and (cfg.model.trainable or offload):
        why = "model.trainable unfreezes backbone parameters" if cfg.model.trainable else "offload_param is set"
        raise ConfigError(
            f"train.frozen_backbone=replicated keeps a frozen backbone whole, outside ZeRO, but {why} "
            "(use train.frozen_backbone=partitioned or auto)"
        )
    if choice != "auto":
        return E.Placement(choice, f"train.frozen_backbone={choice}")
    if cfg.model.trainable:
        return E.Placement("partitioned", "model.trainable unfreezes backbone parameters: ZeRO-3 owns them")
    if offload:
        return E.Placement("partitioned", "offload_param keeps parameters off the GPU")
    if not torch.cuda.is_available():
        return E.Placement("partitioned", "auto on a CPU (train.frozen_backbone=replicated to keep it whole)")
    gpu = torch.cuda.get_device_properties(torch.cuda.current_device())
    fit = for_run(cfg, zero, world_size, gpu.total_memory, E.precision(cfg), teacher_cfg)
    return E.Placement(fit["placement"], f"auto: {fit['why']} (tagi_ds.plan.for_run)")
