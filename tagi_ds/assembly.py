"""One run assembly: backbone -> model -> artifacts -> engine -> device, for every entry point.

Training (``train/loop.py``), evaluation (``eval/evaluate.py``), the PEFT export (``export/peft.py``), the server
(``serve/engine.py``), the diagnosis (``diagnose.py``), the planner's measured step and counts (``plan/``) and the
benchmarks build their run with :func:`assemble` (or, on the meta device for preflight and counting,
:func:`meta_model`) from the run's resolved :class:`tagi_ds.stages.Spec`, never from the stage's name. What
differs between them is a parameter, not a copy:

=================  ===========================================================================================
``runner``         what runs the steps
=================  ===========================================================================================
``train``          a DeepSpeed engine with AdamW and the LR schedule (``runtime.engine.build_engine``), the
                   backbone kept where ``placement`` says (``tagi_ds.plan.for_training`` decides)
``torch``          one process, no DeepSpeed: the module in the training dtype on ``device`` (the planner's
                   measured step, the benchmarks' torch engine); the caller owns the optimizer
``infer``          frozen, eval mode: under ZeRO-3 a DeepSpeed engine without optimizer around ``step(model)``
                   (evaluation's generation step), else that module on ``device`` (evaluation, the server)
``none``           the model as built on the CPU, no engine (the export gathers its parameters for one forward;
                   the diagnosis)
=================  ===========================================================================================

The result is typed (:class:`Run`): the model, the runner, the device, where the backbone was put
(``runtime.engine.Placement``) and where the frozen teacher bank is kept (``runtime.engine.TeacherHome``), read from
it rather than from attributes stamped on the modules. ``Run.teacher_backbone`` is the slot of a separate teacher
model (a teacher with its own backbone, not the student's LoRA bank); nothing fills it yet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from tagi_ds import artifacts, stages
from tagi_ds.config import ConfigError, TagiConfig
from tagi_ds.runtime import dist, preflight
from tagi_ds.runtime import engine as E

Runner = Literal["train", "torch", "infer", "none"]


@dataclass(frozen=True)
class Loads:
    """What the model starts from, loaded before any engine is built (each checked by preflight already)."""

    teachers: Path | None = None  # finetune: the frozen teacher bank's teachers/ dir (--teachers)
    init_hypernet: Path | None = None  # finetune: a pretrained hypernet/ to start from (--init_hypernet)
    artifact: Path | None = None  # the mode's trained artifact: hypernet/, baseline_lora/ or teachers/ (evaluation)


@dataclass
class Run:
    """An assembled run."""

    model: torch.nn.Module  # the TagiModel (or the benchmarks' ``adapt``-ed module)
    runner: Any  # what a step calls: the DeepSpeed engine, or the module itself (``torch``, ``infer``, ``none``)
    device: torch.device  # where its batches go
    placement: E.Placement  # where the frozen backbone lives, and why
    world_size: int = 1  # ranks it was assembled for
    teacher_home: E.TeacherHome | None = None  # where the frozen teacher bank is kept (None: no bank)
    teacher_backbone: torch.nn.Module | None = None  # a separate teacher model's backbone: not built yet

    def describe(self) -> str:
        """The engine's one line on where parameters live under ZeRO-3 (empty without it)."""
        return E.describe_partitioning(self.model, self.world_size, self.placement, self.teacher_home)


def _spec(spec: stages.Spec) -> stages.Spec:
    if not isinstance(spec, stages.Spec):  # the name would be resolved again here: the caller resolves it once
        raise TypeError(f"assemble takes the run's resolved stages.Spec, not {type(spec).__name__} {spec!r}")
    return spec


def load(model: torch.nn.Module, loads: Loads) -> None:
    """``loads`` into ``model`` (before any engine is built: ZeRO-3 partitions what it is given)."""
    if loads.teachers is not None:
        artifacts.load_teachers(model.teacher, loads.teachers, model)
    if loads.init_hypernet is not None:
        artifacts.load_hypernet(model, loads.init_hypernet, "--init_hypernet")
    if loads.artifact is not None:
        artifacts.load(model, loads.artifact)


def build_teacher_model(tcfg: TagiConfig, ds: dict[str, Any], special_ids: dict[str, int]) -> torch.nn.Module:
    """The frozen separate teacher model (``--teacher_model``, ``tagi_ds.teacher_model``): built as the backbone is,
    partitioned as it is created under ZeRO-3, else whole; frozen and in eval mode (``TagiModel.train`` keeps it
    there). Where it lives is recorded on it (``tagi_teacher``)."""
    where = "partitioned" if E.zero_stage(ds) == 3 else "whole"
    placement = E.Placement(where, f"the frozen teacher model {tcfg.model.model_name_or_path}")
    teacher = E.build_backbone(tcfg, ds, special_ids, placement)
    teacher.tagi_teacher = placement
    teacher.requires_grad_(False)
    return teacher.eval()


def assemble(
    spec: stages.Spec,
    cfg: TagiConfig,
    ds: dict[str, Any],
    special_ids: dict[str, int],
    *,
    runner: Runner = "train",
    world_size: int = 1,
    placement: E.Placement | None = None,
    rows: int = 0,
    teacher: bool | None = None,
    loads: Loads = Loads(),
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    init_on_device: bool | None = None,
    step: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    adapt: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    teacher_init: str = "peft",
    teacher_model: TagiConfig | None = None,
) -> Run:
    """Build the run of ``spec`` under ``cfg`` and the final DeepSpeed dict ``ds`` (``{}``: no DeepSpeed).

    ``placement``: where the frozen backbone lives (a ``train`` run must say: ``tagi_ds.plan.for_training``;
    default: as ZeRO-3 runs built it, ``runtime.engine.inference_placement``, or whole for ``torch``). ``rows``:
    the LoRA bank's rows (the teachers stage) or the frozen teacher bank's; ``teacher``: build that frozen bank
    (default ``spec.teacher``), ``teacher_init="empty"``: uninitialised (benchmarks). ``loads``: the artifacts the
    model starts from. ``device``: where a ``torch`` / ``infer`` run's steps run (default this rank's).
    ``dtype``: the parameters' dtype outside DeepSpeed (``torch``: required; ``infer``: optional, the server's).
    ``init_on_device``: build a large random-init backbone directly on the device (default for ``train`` and
    ``torch``). ``step``: the module an ``infer`` runner runs around the model (evaluation's ``EvalStep``).
    ``adapt``: a module to build on the backbone instead of the TagiModel (the benchmarks' peft cross-check).
    ``world_size`` is the process group's (checked against it for a ``train`` run). ``teacher_model``: the config
    of a separate frozen teacher model (``--teacher_model``, ``tagi_ds.teacher_model``), built as the backbone is
    and attached to the model before the engine, so that ZeRO-3 partitions and hooks it too.
    """
    from tagi_ds.model import build_model

    spec = _spec(spec)
    if runner == "train":
        if placement is None:
            raise ValueError("a train run needs its placement (tagi_ds.plan.for_training)")
        if dist.world_size() != world_size:
            raise RuntimeError(f"assembled for {world_size} rank(s), the process group has {dist.world_size()}")
    elif placement is None and runner == "torch":
        placement = E.Placement("whole", "one process, no DeepSpeed")
    elif placement is None:
        placement = E.inference_placement(ds)
    if runner == "torch" and dtype is None:
        raise ValueError("a torch run needs its dtype")
    here = device or (dist.device() if runner in ("train", "torch", "infer") else torch.device("cpu"))
    on_device = init_on_device if init_on_device is not None else runner in ("train", "torch")
    backbone = E.build_backbone(cfg, ds, special_ids, placement, device=here if on_device else None)
    if adapt is not None:
        model = adapt(backbone)
    else:
        with_teacher = spec.teacher if teacher is None else teacher
        model = build_model(
            cfg, spec, backbone, num_bank_rows=rows, with_teacher=with_teacher, teacher_init=teacher_init
        )
    if teacher_model is not None:
        model.teacher_model = build_teacher_model(teacher_model, ds, special_ids)
    load(model, loads)
    if runner == "train":
        eng = E.build_engine(model, cfg, ds, placement)
        home = E.keep_teacher(model, E.train_dtype(ds), eng.device)
        return Run(model, eng, eng.device, placement, world_size, home)
    if runner == "torch":
        # Parameters only, as the training engine casts them: ``.to(dtype)`` would also cast RoPE's fp32 inv_freq.
        E.place(E.cast_parameters(model, dtype), here)
        return Run(model, model, here, placement, world_size, E.keep_teacher(model, dtype, here))
    if runner == "none":
        return Run(model, model, torch.device("cpu"), placement, world_size)
    model.requires_grad_(False).eval()
    module = step(model) if step is not None else model
    if E.zero_stage(ds) == 3:  # it gathers the partitioned backbone layer by layer
        eng = E.inference_engine(module, ds)
        return Run(model, eng, eng.device, placement, world_size)
    if here.type == "cuda":
        torch.cuda.set_device(here)
    if dtype is not None:
        E.cast_parameters(model, dtype)
    return Run(model, E.place(module, here).eval(), here, placement, world_size)


def meta_model(
    cfg: TagiConfig, spec: stages.Spec, special_ids: dict[str, int], rows: int = 0, teacher: bool = False
) -> torch.nn.Module:
    """The TagiModel a run of ``spec`` will build, on the meta device: its adapted sites, parameter names and
    shapes, at no memory cost (preflight checks artifacts against it; the planner counts it). Building it checks
    the model settings (projections, stacks, trainable regexes...); with ``model.model_name_or_path`` it is built
    from that directory's config.json and its weight files' headers are checked against it."""
    from tagi_ds import model as tagi_model

    spec = _spec(spec)
    try:
        with torch.device("meta"):
            if cfg.model.model_name_or_path:
                backbone = preflight.meta_pretrained(cfg)
            else:
                backbone = tagi_model.build_backbone(cfg, special_ids)
            return tagi_model.build_model(cfg, spec, backbone, num_bank_rows=rows, with_teacher=teacher)
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as err:  # transformers' config checks
        where = "--model_name_or_path" if cfg.model.model_name_or_path else "model"
        preflight.fail(
            where,
            f"cannot build this backbone: {type(err).__name__}: {str(err).splitlines()[0]}",
            cfg.model.model_name_or_path,
        )


def plain_backbone(cfg: TagiConfig, special_ids: dict[str, int] | None = None) -> torch.nn.Module:
    """The backbone alone, as a run of ``cfg`` without ZeRO-3 builds it, on the CPU (no adapted sites: what a PEFT
    adapter exported from the run is loaded onto)."""
    return E.build_backbone(cfg, {}, special_ids or {}, E.Placement("whole", "the backbone alone"))
