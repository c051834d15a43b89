"""The in-memory form of every task source: a task is a definition (+ demonstrations) and its instances.

SNI files, the built-in suite and P3 templates all become ``Task`` objects; everything downstream
(prompt formatting, sampling, collation) only sees these.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from tagi_ds.errors import DataError, say


def note(message: str) -> None:
    """Tell the user what a filter did (stdout, rank 0 only): data is never dropped silently."""
    say(f"note: {message}")


def show(value: object, limit: int = 60) -> str:
    """A short one-line ``repr`` of ``value`` for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Demo:
    """A positive or negative example shown in the instruction (SNI ``Positive Examples``)."""

    input: str
    output: str
    explanation: str = ""


@dataclass(frozen=True)
class Example:
    """One instance. ``outputs``: accepted answers (train on one, score against all); ``choices``: answer
    options for rank classification (P3), empty otherwise."""

    id: str
    input: str
    outputs: tuple[str, ...]
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Task:
    """A task. ``definitions``: the Definition paraphrases (SNI has one; [0] is the canonical one)."""

    name: str
    category: str
    definitions: tuple[str, ...]
    instances: tuple[Example, ...]
    positives: tuple[Demo, ...] = ()
    negatives: tuple[Demo, ...] = ()
    source: str = field(default="", compare=False)  # where it was read from, for messages


def select_tasks(
    tasks: Sequence[Task],
    *,
    categories: Sequence[str] = (),
    max_instances: int | None = None,
    sample_seed: str | None = None,
    where: str = "data",
    names: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> list[Task]:
    """Keep tasks of ``categories`` (empty = all), named in ``names`` (``data.tasks``; empty = all) and not
    named in ``exclude`` (``data.exclude_tasks``: names absent from this split are ignored, so one config
    serves the train and the test split; a name in both lists is kept, so a run trained with a validation
    split excluded is evaluated on it with ``data.tasks`` alone), with at most ``max_instances`` instances
    each.

    ``sample_seed`` None takes the first instances (the SNI test convention: the first 100 are the official
    evaluation set); otherwise a seeded sample that keeps file order (Tk-Instruct samples training instances).
    Instance ids must be unique across the selection: predictions are keyed by them.
    """
    chosen = [t for t in tasks if not categories or t.category in categories]
    if categories and not chosen:
        known = sorted({t.category for t in tasks})
        raise DataError(f"{where}: data.categories {list(categories)!r} match no task (known: {show(known, 200)})")
    wanted = set(names)
    if wanted:
        missing = sorted(wanted - {t.name for t in chosen})
        if missing:
            known = sorted(t.name for t in chosen)
            raise DataError(
                f"{where}: data.tasks names {show(missing, 200)}, not a task of this split (known: {show(known, 200)})"
            )
        chosen = [t for t in chosen if t.name in wanted]
    dropped = set(exclude) - wanted  # a task named in data.tasks is kept: the explicit choice wins
    chosen = [t for t in chosen if t.name not in dropped]
    if exclude and not chosen:
        raise DataError(f"{where}: data.exclude_tasks {show(list(exclude), 200)} leaves no task")
    out, seen = [], {}
    for task in chosen:
        inst = task.instances
        if max_instances is not None and max_instances >= 0 and len(inst) > max_instances:
            if sample_seed is None:
                inst = inst[:max_instances]
            else:
                keep = sorted(random.Random(f"{sample_seed}:{task.name}").sample(range(len(inst)), max_instances))
                inst = tuple(inst[i] for i in keep)
        for ex in inst:
            if ex.id in seen:
                raise DataError(
                    f"{task.source or task.name}: field Instances.id: duplicate id {show(ex.id)} "
                    f"(also in {seen[ex.id]})"
                )
            seen[ex.id] = task.name
        out.append(replace(task, instances=inst))
    return out
