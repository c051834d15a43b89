"""Build functions: config + tokenizer -> the loader a stage iterates.

What the batches hold, per stage and mode (:mod:`tagi_ds.stages`: the stage's data, the mode's view):

=========  ==============  ======================================  =======  ===========  =============
stage      mode            input_ids (+ labels)                    instr_*  teacher_*    teacher_index
=========  ==============  ======================================  =======  ===========  =============
teachers   (any)           instruction + input (Tk-Instruct)       -        -            row per task [2]
pretrain   (tagi)          window segment b (labels: segment c)    a        -            -
finetune   tagi            input                                   yes      KL view [1]  if rows given
finetune   concat          instruction + input                     -        KL view [1]  if rows given
finetune   no_instruction  input                                   -        KL view [1]  if rows given
eval       (as finetune)   as finetune; first definition, answer   as ft.   -            -
=========  ==============  ======================================  =======  ===========  =============

[1] instruction + input with the same targets, when ``teacher_rows`` is given and a term that reads it is on
(``loss_terms.wants_teacher_view``: ``loss.kl_weight > 0``).
[2] or per category (``teacher.granularity``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

from tagi_ds import families, loss_terms, stages
from tagi_ds.batch import TaskBatch
from tagi_ds.config import TagiConfig
from tagi_ds.data.collate import PretrainCollator, TaskCollator
from tagi_ds.data.corpus import WindowStream, corpus_files, load_windows
from tagi_ds.data.sampler import EvalSampler, TaskBatchSampler
from tagi_ds.data.spec import corpus_source, load_tasks
from tagi_ds.data.spec import teacher_rows as default_teacher_rows
from tagi_ds.data.task import DataError, Task


class TaskLoader:
    """Infinite iterator of ``TaskBatch`` over a sampler, epoch-based, with exact resume.

    ``state_dict()`` holds the sampler position and the truncation counters (save it per rank with the
    checkpoint); after ``load_state_dict`` the loader yields exactly the batches an uninterrupted one
    would have. ``epoch``, ``step`` (within the epoch) and ``steps_per_epoch`` (None when streaming).
    """

    def __init__(self, sampler, collate, tasks: Sequence[Task] = ()):
        self.sampler, self.collate, self.tasks = sampler, collate, list(tasks)

    def __iter__(self) -> Iterator[TaskBatch]:
        return self

    def __next__(self) -> TaskBatch:
        return self.collate(next(self.sampler))

    epoch = property(lambda self: self.sampler.epoch)
    step = property(lambda self: self.sampler.step)
    steps_per_epoch = property(lambda self: self.sampler.steps_per_epoch)
    stats = property(lambda self: self.collate.stats)

    def report(self) -> str:
        return self.collate.report()

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "stats": dict(self.collate.stats)}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.collate.stats = Counter(state.get("stats", {}))


class _WindowPlans:
    """In-memory windows under a TaskBatchSampler (each window a one-example task)."""

    def __init__(self, windows, sampler: TaskBatchSampler):
        self.windows, self.sampler = windows, sampler

    def __next__(self):
        return [(f"window{s.task}", self.windows[s.task].tolist(), s.variant) for s in next(self.sampler)]

    epoch = property(lambda self: self.sampler.epoch)
    step = property(lambda self: self.sampler.step)
    steps_per_epoch = property(lambda self: self.sampler.steps_per_epoch)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def _views(mode: stages.Mode) -> dict:
    """The collator's views of a mode: what the backbone reads, and whether batches carry the instruction."""
    return {"input_view": mode.view, "instruction": mode.instruction}


def _check(cfg: TagiConfig) -> None:
    d = cfg.data
    if d.pretrain_length < 3:
        raise DataError(f"data.pretrain_length must be >= 3 (a|b|c, none empty), got {d.pretrain_length}")
    for key in ("max_instruction_length", "max_source_length", "max_target_length"):
        if getattr(d, key) < 2:
            raise DataError(f"data.{key} must be >= 2 (a token + eos), got {getattr(d, key)}")


def build_train_loader(
    cfg: TagiConfig,
    tokenizer,
    stage: stages.Spec | str,
    rank: int = 0,
    world_size: int = 1,
    teacher_rows: dict[str, int] | None = None,
    tasks: Sequence[Task] | None = None,
    teacher_view: bool | None = None,
) -> TaskLoader:
    """The training loader of ``stage`` (its spec, or a name: teachers | pretrain | finetune) for ``rank`` of
    ``world_size``.

    ``tasks`` defaults to ``load_tasks(cfg.data.spec, cfg.data, "train")``. ``teacher_rows``: name -> bank
    row (task or category names per ``cfg.teacher.granularity``); for ``teachers`` it defaults to
    :func:`teacher_rows` of the tasks. Micro-batches: ``tasks_per_batch`` x ``examples_per_task`` rows
    (pretrain: that many windows, one task each). Seeded by ``cfg.train.seed``. ``teacher_view``: fill the
    teacher's view (default: with ``teacher_rows`` and ``loss.kl_weight > 0``; a separate teacher model needs it
    without rows).
    """
    _check(cfg)
    d, arch, seed = cfg.data, cfg.model.arch, cfg.train.seed
    spec = stage if isinstance(stage, stages.Spec) else stages.spec(stage, cfg)  # a run passes its own
    if spec.stage.data == "corpus":
        collate = PretrainCollator(tokenizer, d, arch)
        batch = d.tasks_per_batch * d.examples_per_task
        source = corpus_source(d)
        if d.streaming and source is not None:
            stream = WindowStream(corpus_files(source), tokenizer, d.pretrain_length, batch, seed, rank, world_size)
            return TaskLoader(stream, collate)
        windows = load_windows(source, tokenizer, d.pretrain_length)
        return TaskLoader(
            _WindowPlans(windows, TaskBatchSampler([1] * len(windows), batch, 1, seed, rank, world_size)), collate
        )
    tasks = list(tasks) if tasks is not None else load_tasks(d.spec, d, "train")
    sampler = TaskBatchSampler(
        [len(t.instances) for t in tasks], d.tasks_per_batch, d.examples_per_task, seed, rank, world_size
    )
    common = dict(arch=arch, teacher_key=cfg.teacher.granularity, sample=d.sample_variants, **_views(spec.mode))
    if spec.mode.source.per_task:  # the teachers themselves: each task's own bank row
        rows = teacher_rows if teacher_rows is not None else default_teacher_rows(tasks, cfg.teacher.granularity)
        collate = TaskCollator(tasks, tokenizer, d, teacher_rows=rows, **common)
    else:
        collate = TaskCollator(
            tasks,
            tokenizer,
            d,
            teacher_rows=teacher_rows,
            teacher_view=teacher_view
            if teacher_view is not None
            else teacher_rows is not None and loss_terms.wants_teacher_view(cfg.loss),
            **common,
        )
    return TaskLoader(sampler, collate, tasks)


def _mode(name: str) -> stages.Mode:
    if name not in stages.MODES:
        raise DataError(f"mode must be one of {', '.join(stages.MODES)}, got {name!r}")
    return stages.MODES[name]


class EvalLoader:
    """One pass over the split's instances (finite, ``len`` = steps on this rank); see :class:`EvalSampler`."""

    def __init__(self, sampler: EvalSampler, collate: TaskCollator, tasks: Sequence[Task]):
        self.sampler, self.collate, self.tasks = sampler, collate, list(tasks)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[TaskBatch]:
        return (self.collate(plan) for plan in self.sampler)


def build_eval_loader(
    cfg: TagiConfig,
    tokenizer,
    split: str = "test",
    rank: int = 0,
    world_size: int = 1,
    generation: bool = True,
    tasks: Sequence[Task] | None = None,
    batch_size: int | None = None,
) -> EvalLoader:
    """Ordered batches over every instance of ``split`` (views per ``cfg.mode``; first definition and first
    answer). ``generation``: LLaMA batches are left-padded prompts with ``[B, Lt]`` labels (see collate)."""
    _check(cfg)
    d = cfg.data
    tasks = list(tasks) if tasks is not None else load_tasks(d.spec, d, split)
    sampler = EvalSampler(
        [len(t.instances) for t in tasks], batch_size or d.tasks_per_batch * d.examples_per_task, rank, world_size
    )
    llama_gen = generation and families.get(cfg.model.arch).causal  # every decoder-only family
    collate = TaskCollator(
        tasks,
        tokenizer,
        d,
        arch=cfg.model.arch,
        **_views(_mode(cfg.mode)),
        padding_side="left" if llama_gen else "right",
        with_targets=not llama_gen,
    )
    return EvalLoader(sampler, collate, tasks)
