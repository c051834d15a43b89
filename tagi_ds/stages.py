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

from tagi_ds.config import ConfigError, ModeName, TagiConfig

Adapters = Literal["generated", "shared", "per_task"]
ARTIFACT = {"generated": "hypernet", "shared": "baseline_lora", "per_task": "teachers"}  # the dir that holds them
EVAL_FLAG = {"generated": "hypernet", "shared": "adapter", "per_task": "teachers"}  # evaluate.py's flag for that dir


@dataclass(frozen=True)
class Mode:
    """What the backbone reads, and where each task's adapters come from."""

    name: str
    adapters: Adapters  # generated (the hypernetwork) | shared (one LoRA for every task) | per_task (a bank row)
    view: Literal["input", "concat"]  # the backbone reads the input, or instruction + input (Tk-Instruct)
    stage: str  # the stage whose model runs this mode (evaluation builds that model)

    @property
    def instruction(self) -> bool:
        """Batches carry each task's instruction once (the hypernetwork reads it)."""
        return self.adapters == "generated"

    @property
    def artifact(self) -> str:
        """The artifact dir that holds this mode's adapters: what training writes, evaluation reads."""
        return ARTIFACT[self.adapters]

    @property
    def flag(self) -> str:
        """The flag of ``launchers/evaluate.py`` that names that artifact: --hypernet, --adapter, --teachers."""
        return f"--{EVAL_FLAG[self.adapters]}"


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("tagi", "generated", "input", "finetune"),
    Mode("concat", "shared", "concat", "finetune"),
    Mode("no_instruction", "shared", "input", "finetune"),
    Mode("teacher", "per_task", "concat", "teachers"),
)}
assert set(get_args(ModeName)) < set(MODES), "every config mode has a row"


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


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("teachers", "tasks", "a LoRA per task", "train_teachers.py", mode="teacher"),
    Stage("pretrain", "corpus", "the hypernetwork", "pretrain.py", modes=("tagi",)),
    Stage("finetune", "tasks", "the hypernetwork or a baseline's LoRA", "finetune.py",
          inputs=("teachers", "init_hypernet")),
)}


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
    teacher = s.distils and mode.instruction and (cfg.loss.kl_weight > 0 or cfg.loss.param_weight > 0)
    return Spec(s, mode, teacher)
