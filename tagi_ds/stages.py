"""Stages and modes: what each run needs, decided in one place.

A run trains one *stage* in one *mode*. The stage says what is trained, on which data, from which inputs; the
mode says what the backbone reads and where each task's adapters come from. The model builder, the loaders,
preflight, the training loop and evaluation ask :func:`spec` (or :data:`MODES`) instead of comparing names.

=========  ======  ==============================  ===============================  =================  ==============
stage      data    mode                            trains                           teacher            writes
=========  ======  ==============================  ===============================  =================  ==============
teachers   tasks   teacher (whatever ``mode``)     a LoRA-bank row per task [1]     -                  teachers/
pretrain   corpus  tagi                            the hypernetwork                 -                  hypernet/
finetune   tasks   tagi                            the hypernetwork                 ``--teachers`` [2] hypernet/
finetune   tasks   concat, no_instruction          one shared LoRA                  -                  baseline_lora/
=========  ======  ==============================  ===============================  =================  ==============

[1] or per category (``teacher.granularity``). [2] when ``loss.kl_weight`` or ``loss.param_weight`` > 0: the
frozen teacher bank gives the KL and parameter-alignment targets.

==============  ==============================  ==========================================
mode            the backbone reads              each task's adapters
==============  ==============================  ==========================================
tagi            input (+ fused instruction, T5)  generated from the task's instruction
concat          instruction + input             one shared LoRA
no_instruction  input                           one shared LoRA
teacher         instruction + input             the task's own row of the teacher bank
==============  ==============================  ==========================================

``teacher`` is no value of ``mode`` in the config: it is the teachers stage's mode, and what evaluation's
``--teachers`` runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from tagi_ds import loss_terms
from tagi_ds.config import ConfigError, Granularity, ModeName, TagiConfig


class AdapterSource:
    """Where a run's adapters come from: a strategy object (as peft's ``LoraVariant`` is for a LoRA layer's
    math) that every user asks instead of comparing names. It builds its trainable parameters, produces a batch's
    adapters, says which parameters ZeRO-3 keeps whole, and describes its artifact (dir, tensors file, the
    evaluation flag, the rows it saves); ``tagi_ds.artifacts`` writes, checks and loads that artifact from this
    description alone. A new baseline is one subclass and a :data:`MODES` row pointing at it.
    """

    name: str  # in words, and the key of :data:`SOURCES`
    dir: str  # the artifact dir that holds its parameters (training writes it, evaluation reads it)
    flag: str  # launchers/evaluate.py's flag for that dir
    file: str  # the artifact's tensors file (the trained module's state_dict, float32)
    instruction: bool = False  # batches carry each task's instruction once (the hypernetwork reads it)
    per_task: bool = False  # one bank row per task (or category): loaders and evaluation need teacher rows
    whole: str = ""  # what ZeRO-3 keeps whole, in words (engine's partitioning line); "" for nothing
    optional: tuple[str, ...] = ()  # tensors an older artifact may lack (checked and loaded without them)
    fingerprint: bool = False  # its artifact records the backbone weights it was trained against (a warning on others)
    bare: bool = False  # evaluation may run its mode without the artifact: the bare backbone (a baseline's floor)
    made_by: str = ""  # the launchers that write its artifact (errors asking for it)

    def build(self, sites, cfg: TagiConfig, d_model: int, rows: int, fusion: bool) -> dict:
        """The modules it trains, as ``TagiModel`` keyword arguments (``generator=`` or ``bank=``)."""
        raise NotImplementedError

    def adapters(self, model, batch, use: bool = True):
        """``(AdapterSet | None, instruction states [K, Li, d] | None)`` for ``batch``; ``use=False``: none
        (a baseline evaluated on the bare backbone)."""
        raise NotImplementedError

    def trained(self, model):
        """The module whose parameters are the artifact: the hypernetwork or the LoRA bank."""
        return model.bank

    def kept_whole(self, model) -> list:
        """The parameters ZeRO-3 keeps gathered on every rank (small, and used whole at every step)."""
        return list(self.trained(model).parameters()) if self.whole else []

    def rows(self, rows: dict[str, int] | None, cfg: TagiConfig) -> tuple[dict[str, int], str] | None:
        """The artifact's ``rows.json`` and granularity, or None when it has no rows (the hypernetwork)."""
        return rows, cfg.teacher.granularity


class Generated(AdapterSource):
    """The hypernetwork: each task's adapters generated from its instruction (TAGI)."""

    name, dir, flag, file, instruction, whole = (
        "generated",
        "hypernet",
        "hypernet",
        "generator.safetensors",
        True,
        "hypernetwork",
    )
    optional = ("marker.vector",)  # a hypernet saved without hypernet.fusion_marker
    made_by = "pretrain.py or finetune.py"
    fingerprint = True  # generated adapters fit the backbone they were trained with, not another of its shape

    def build(self, sites, cfg, d_model, rows, fusion):
        from tagi_ds.hypernet import Generator

        return {"generator": Generator(d_model, sites, cfg.hypernet, fusion=fusion)}

    def adapters(self, model, batch, use=True):
        return model.generate(batch)

    def trained(self, model):
        return model.generator

    def rows(self, rows, cfg):
        return None


class SharedLora(AdapterSource):
    """One LoRA for every task (the concat / no_instruction baselines): a one-row bank, every example on row 0."""

    name, dir, flag, file, whole = "shared", "baseline_lora", "adapter", "teachers.safetensors", "shared LoRA"
    bare, made_by = True, "finetune.py"
    granularity = "shared"  # rows.json's granularity: every task on row 0

    def build(self, sites, cfg, d_model, rows, fusion):
        from tagi_ds.adapters import LoraBank

        return {"bank": LoraBank(sites, 1, cfg.hypernet.rank, cfg.hypernet.alpha)}

    def adapters(self, model, batch, use=True):
        return (model.bank_adapters(model.bank, batch, shared=True) if use else None), None

    def rows(self, rows, cfg):
        return {"*": 0}, self.granularity


class TaskBank(AdapterSource):
    """A LoRA-bank row per task (or category): the teachers stage, and evaluation's ``--teachers``."""

    name, dir, flag, file, per_task = "per_task", "teachers", "teachers", "teachers.safetensors", True
    made_by = "train_teachers.py"

    def build(self, sites, cfg, d_model, rows, fusion):
        from tagi_ds.adapters import LoraBank

        if rows <= 0:
            raise ConfigError("stage teachers needs at least one task (num_bank_rows > 0)")
        return {"bank": LoraBank(sites, rows, cfg.teacher.rank, cfg.teacher.alpha)}

    def adapters(self, model, batch, use=True):
        return model.bank_adapters(model.bank, batch), None


SOURCES: dict[str, AdapterSource] = {s.name: s for s in (Generated(), SharedLora(), TaskBank())}
# What a rows.json may say: a teacher bank's granularity, or the shared LoRA's.
ROW_GRANULARITIES = (*get_args(Granularity), SharedLora.granularity)


@dataclass(frozen=True)
class Mode:
    """What the backbone reads, and where each task's adapters come from."""

    name: str
    source: AdapterSource  # generated (the hypernetwork) | one shared LoRA | a bank row per task
    view: Literal["input", "concat"]  # the backbone reads the input, or instruction + input (Tk-Instruct)
    stage: str  # the stage whose model runs this mode (evaluation builds that model)
    runs_as: str | None = None  # the config mode a run of it is configured as (teacher: concat), when not its own

    @property
    def config_mode(self) -> str:
        """The value of the config's ``mode`` for a run of this mode (evaluation's ``--teachers``: concat)."""
        return self.runs_as or self.name

    @property
    def instruction_in_input(self) -> bool:
        """The backbone reads the instruction as text before the input (Tk-Instruct's view)."""
        return self.view == "concat"

    @property
    def instruction(self) -> bool:
        """Batches carry each task's instruction once (the hypernetwork reads it)."""
        return self.source.instruction

    @property
    def artifact(self) -> str:
        """The artifact dir that holds this mode's adapters: what training writes, evaluation reads."""
        return self.source.dir

    @property
    def flag(self) -> str:
        """The flag of ``launchers/evaluate.py`` that names that artifact: --hypernet, --adapter, --teachers."""
        return f"--{self.source.flag}"


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("tagi", SOURCES["generated"], "input", "finetune"),
        Mode("concat", SOURCES["shared"], "concat", "finetune"),
        Mode("no_instruction", SOURCES["shared"], "input", "finetune"),
        Mode("teacher", SOURCES["per_task"], "concat", "teachers", runs_as="concat"),
    )
}
assert set(get_args(ModeName)) < set(MODES), "every config mode has a row"
# The mode evaluation's costs are reported against (eval/table.py's "FLOPs / concat"): Tk-Instruct's instruction +
# input, the cost TAGI saves.
COST_REFERENCE = "concat"


def flag_mode(flag: str) -> str | None:
    """The one mode an artifact flag of ``launchers/evaluate.py`` selects (hypernet: tagi, teachers: teacher), or
    None when its artifact says which (``--adapter``: concat or no_instruction)."""
    modes = [m.name for m in MODES.values() if m.source.flag == flag]
    return modes[0] if len(modes) == 1 else None


@dataclass(frozen=True)
class Stage:
    """One training stage: its data, the modes it trains, the artifacts it may start from."""

    name: str
    data: Literal["tasks", "corpus"]  # the training loader: task batches, or a|b|c windows of a text corpus
    trains: str  # what it trains, in words (errors and --help)
    launcher: str
    modes: tuple[str, ...] = get_args(ModeName)  # the config modes it accepts
    mode: str | None = None  # its own mode, whatever the config's (teachers: teacher)
    inputs: tuple[str, ...] = ()  # artifact flags it reads: --teachers (the KL / alignment targets), --init_hypernet

    @property
    def distils(self) -> bool:
        """It may train against the frozen teacher bank (``--teachers``)."""
        return "teachers" in self.inputs


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("teachers", "tasks", "a LoRA per task", "train_teachers.py", mode="teacher"),
        Stage("pretrain", "corpus", "the hypernetwork", "pretrain.py", modes=("tagi",)),
        Stage(
            "finetune",
            "tasks",
            "the hypernetwork or a baseline's LoRA",
            "finetune.py",
            inputs=("teachers", "init_hypernet", "teacher_model"),
        ),
    )
}


@dataclass(frozen=True)
class Spec:
    """What one training run needs, decided once from its stage and config."""

    stage: Stage
    mode: Mode
    teacher: bool  # it distils: the frozen teacher bank from --teachers (KL and parameter alignment targets)

    @property
    def artifact(self) -> str:
        """The final artifact dir it writes under ``--output_dir``."""
        return self.mode.artifact


def spec(stage: str, cfg: TagiConfig) -> Spec:
    """The run of ``stage`` under ``cfg``; a stage that cannot train ``cfg.mode`` is a ConfigError."""
    if stage not in STAGES:
        raise ConfigError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    s = STAGES[stage]
    if s.mode is None and cfg.mode not in s.modes:
        raise ConfigError(f"stage {s.name} trains {s.trains}: mode must be {' or '.join(s.modes)}, got {cfg.mode!r}")
    mode = MODES[s.mode or cfg.mode]
    teacher = s.distils and mode.instruction and loss_terms.wants_teacher(cfg.loss)
    return Spec(s, mode, teacher)
