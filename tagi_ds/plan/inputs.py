"""What a plan is asked about: ``PlanInput`` (the command line's flags as a dataclass), its resolution against
the recipe (defaults filled in, combinations checked, errors naming the flag), the per-GPU micro-batch shapes
it implies (``shapes_of``) and the ZeRO settings of the DeepSpeed JSON it names (``ds_zero``).

Default throughput: H100 SXM bf16 dense peak 989 TFLOP/s x an assumed 40% MFU = 396 TFLOP/s; pass a measured
one (``--tflops_per_gpu``, from benchmarks/bench_train_step.py) instead.

``--backbone`` (ZeRO-3 only): where the frozen backbone lives. ``partitioned``: ZeRO-3 owns it, every rank holds 1/W
and all-gathers each module's weights as it runs, through per-module hooks; ``replicated``: whole on every GPU,
outside ZeRO (no gathers, no hooks; the hypernetwork's optimizer state stays partitioned); ``auto`` (default):
replicated where it fits (``tagi_ds.plan.placement``). Host time of ZeRO-3's module hooks: ``--zero3_hook_us`` per
hook call (default ``ZERO3_HOOK_US``, measured on a CPU host: benchmarks/results/cpu_2026-12-04_profile_*.md).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tagi_ds import loss_terms
from tagi_ds.config import ConfigError, LossConfig, TagiConfig
from tagi_ds.loss_terms import LossTerm
from tagi_ds.plan.shapes import Shapes
from tagi_ds.recipes import RECIPES, get_recipe

GiB = 2**30
H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM datasheet, bf16 tensor core, dense
ASSUMED_MFU = 0.40
# Host time per ZeRO-3 module hook call (fetch + release, forward or backward; with the per-step release and re-gather
# of the same parameters), step time partitioned minus replicated over the difference in fetch_sub_module calls: tiny
# T5 TAGI and LoRA steps on a 1-thread CPU host at load ~2, 128 and 136 us (benchmarks/results/
# cpu_2026-12-04_profile_train_step_after-*.md, docs/perf.md). A GPU host's is not measured yet (the profile stage).
ZERO3_HOOK_US = 130.0
BACKBONES = ("auto", "replicated", "partitioned")
DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


@dataclass
class PlanInput:
    model: str = "t5-xl"
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gb: float = 80.0
    stage: str = "z3"  # z3 | z2 | none (one process, no DeepSpeed)
    offload: str = "none"  # none | optimizer | param
    micro_batch: int | None = None
    examples_per_task: int | None = None
    seq_len: int | None = None
    target_len: int | None = None
    instr_len: int | None = None
    rank: int | None = None
    chunk_tokens: int | None = None  # loss.chunk_tokens
    teacher_rows: int = 60
    teacher_model: str | None = None  # a recipe: a separate frozen teacher model of its shapes gives the KL target
    gradient_checkpointing: bool | None = None
    precision: str | None = None  # bf16 | fp32
    tflops_per_gpu: float | None = None
    interconnect_gbps: float = 400.0
    intra_node_gbps: float = 2400.0
    pcie_gbps: float = 256.0
    deepspeed: str | None = None
    kl: bool = True  # a teacher bank (``--teacher_rows`` > 0): the terms that read it are on
    terms: tuple[str, ...] | None = None  # the loss terms on (``tagi_ds.loss_terms``); ``resolve`` fills it
    backbone: str = "auto"  # ZeRO-3: auto | replicated | partitioned (the frozen backbone's placement)
    zero3_hook_us: float | None = None  # host time per ZeRO-3 module hook call

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def _config(p: PlanInput) -> TagiConfig:
    cfg = get_recipe(p.model)
    if p.rank is not None:
        cfg.hypernet.rank = p.rank
    if p.gradient_checkpointing is not None:
        cfg.model.gradient_checkpointing = p.gradient_checkpointing
    if p.chunk_tokens is not None:
        cfg.loss.chunk_tokens = p.chunk_tokens
    cfg.mode = "tagi"
    return cfg.validate()


def resolve(p: PlanInput) -> tuple[PlanInput, TagiConfig]:
    """Fill the defaults from the recipe and check the combination; errors name the flag."""
    if p.model not in RECIPES:
        raise ConfigError(f"--model {p.model!r} is not a recipe; known: {', '.join(RECIPES)}")
    for flag in (
        "nodes",
        "gpus_per_node",
        "micro_batch",
        "examples_per_task",
        "seq_len",
        "target_len",
        "instr_len",
        "rank",
        "chunk_tokens",
        "gpu_mem_gb",
        "tflops_per_gpu",
        "interconnect_gbps",
        "intra_node_gbps",
        "pcie_gbps",
    ):
        v = getattr(p, flag)
        if v is not None and v <= 0:
            raise ConfigError(f"--{flag} must be > 0, got {v}")
    if p.teacher_rows < 0:
        raise ConfigError(f"--teacher_rows must be >= 0, got {p.teacher_rows}")
    if p.teacher_model is not None and p.teacher_model not in RECIPES:
        raise ConfigError(f"--teacher_model {p.teacher_model!r} is not a recipe; known: {', '.join(RECIPES)}")
    if p.stage not in ("z3", "z2", "none"):
        raise ConfigError(f"--stage must be z3, z2 or none, got {p.stage!r}")
    if p.offload not in ("none", "optimizer", "param"):
        raise ConfigError(f"--offload must be none, optimizer or param, got {p.offload!r}")
    if p.offload == "param" and p.stage != "z3":
        raise ConfigError("--offload param needs --stage z3 (DeepSpeed offloads parameters only under ZeRO-3)")
    if p.backbone not in BACKBONES:
        raise ConfigError(f"--backbone must be one of {', '.join(BACKBONES)}, got {p.backbone!r}")
    if p.backbone == "replicated" and p.offload == "param":
        raise ConfigError(
            "--backbone replicated keeps the whole backbone on every GPU; --offload param moves "
            "parameters off it (use --backbone partitioned or auto)"
        )
    if p.zero3_hook_us is not None and p.zero3_hook_us < 0:
        raise ConfigError(f"--zero3_hook_us must be >= 0, got {p.zero3_hook_us}")
    if p.stage == "none" and (p.world != 1 or p.offload != "none"):
        raise ConfigError(
            "--stage none is one process without DeepSpeed: use --nodes 1 --gpus_per_node 1 --offload none"
        )
    base = get_recipe(p.model)
    q = dataclasses.replace(p)
    q.micro_batch = q.micro_batch or base.data.tasks_per_batch * base.data.examples_per_task
    q.examples_per_task = q.examples_per_task or base.data.examples_per_task
    q.seq_len = q.seq_len or base.data.max_source_length
    q.target_len = q.target_len or base.data.max_target_length
    q.instr_len = q.instr_len or base.data.max_instruction_length
    q.rank = q.rank or base.hypernet.rank
    q.chunk_tokens = q.chunk_tokens or base.loss.chunk_tokens
    if q.gradient_checkpointing is None:
        q.gradient_checkpointing = base.model.gradient_checkpointing
    q.precision = q.precision or ("fp32" if base.model.dtype == "float32" else "bf16")
    if q.precision not in ("bf16", "fp32"):
        raise ConfigError(f"--precision must be bf16 or fp32, got {q.precision!r}")
    q.tflops_per_gpu = q.tflops_per_gpu or H100_BF16_DENSE_TFLOPS * ASSUMED_MFU
    q.kl = q.kl and (q.teacher_rows > 0 or q.teacher_model is not None)  # a teacher model needs no bank rows
    q.zero3_hook_us = ZERO3_HOOK_US if q.zero3_hook_us is None else q.zero3_hook_us
    cfg = _config(q)
    if q.terms is None:  # the recipe's weights: every registered term with a weight > 0 is counted
        q.terms = tuple(t.name for t in loss_terms.active(cfg.loss, teacher=q.kl))
    unknown = [n for n in q.terms if n not in loss_terms.TERMS]
    if unknown:
        raise ConfigError(f"PlanInput.terms: {unknown[0]!r} is no registered loss term ({', '.join(loss_terms.TERMS)})")
    return q, cfg


def terms_of(p: PlanInput) -> list[LossTerm]:
    """The loss terms a plan of ``p`` counts: ``p.terms`` once resolved, else those on with the default weights
    (with a teacher when ``p.kl``)."""
    if p.terms is not None:
        return [loss_terms.TERMS[n] for n in p.terms]
    return stage2_terms(None, p.kl)


def stage2_terms(terms, teacher: bool = True) -> list[LossTerm]:
    """``terms`` as given, or (None) the terms on with the default ``LossConfig`` weights: the stage-2 objective
    (CE + KL + parameter alignment, with a teacher)."""
    return list(terms) if terms is not None else loss_terms.active(LossConfig(), teacher)


def shapes_of(p: PlanInput, micro_batch: int | None = None) -> Shapes:
    B = micro_batch or p.micro_batch
    return Shapes(B, max(1, math.ceil(B / p.examples_per_task)), p.seq_len, p.target_len, p.instr_len)


def ds_zero(p: PlanInput) -> dict[str, Any]:
    """The ``zero_optimization`` block of ``--deepspeed`` (default ds_configs/z3.json or z2.json); {} for none."""
    path = Path(p.deepspeed) if p.deepspeed else DS_CONFIGS / ("z2.json" if p.stage == "z2" else "z3.json")
    from tagi_ds.runtime.engine import load_ds_json

    return load_ds_json(path).get("zero_optimization", {}) if p.stage != "none" else {}
