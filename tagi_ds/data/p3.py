"""P3 (the T0 training mixture) from a local directory: every prompt template of a dataset is a task.

Layout (what a conversion of bigscience/P3 to JSON lines gives; nothing is downloaded)::

    DIR/<dataset>/<template>/train.jsonl         {"inputs": str, "targets": str, "answer_choices": [str]}
    DIR/<dataset>/<template>/validation.jsonl    (test.jsonl is used when there is no validation.jsonl)
    DIR/<dataset>/<template>/template.json       optional: {"name": str, "jinja": str}

``inputs`` is the prompted input (the template already applied), ``targets`` the answer,
``answer_choices`` the options for rank classification (optional; when given, the target must be one of
them). The task's instruction (its definition) is the template text (``jinja``) when ``template.json``
has it, else the template name. Task name ``<dataset>__<template>``; category ``<dataset>`` (teacher
granularity "category" is then one teacher per dataset, as in the paper).

Splits: ``test`` = the T0 held-out datasets (``MTEST11``, read from validation), ``train`` = every other
dataset (read from train.jsonl). A dataset directory is held out when its name is an MTEST11 name or
starts with one followed by ``_`` or ``.`` (``super_glue_wsc.fixed``, ``story_cloze_2016``).
"""

from __future__ import annotations

import itertools
from pathlib import Path

from tagi_ds.config import DataConfig
from tagi_ds.data.task import DataError, Example, Task, select_tasks, show
from tagi_ds.files import check_json_lines, read_json

MTEST11 = (
    "anli_r1",
    "anli_r2",
    "anli_r3",
    "hellaswag",
    "super_glue_cb",
    "super_glue_copa",
    "super_glue_rte",
    "super_glue_wic",
    "super_glue_wsc",
    "winogrande",
    "story_cloze",
)


def is_held_out(dataset: str) -> bool:
    return any(dataset == n or dataset.startswith((n + "_", n + ".")) for n in MTEST11)


def _instruction(template_dir: Path) -> str:
    meta_file = template_dir / "template.json"
    if not meta_file.is_file():
        return template_dir.name.replace("_", " ")
    meta = read_json(meta_file)
    if not isinstance(meta, dict):
        raise DataError(f"{meta_file}: expected a JSON object, got {show(meta)}")
    for key in ("jinja", "name"):
        if key in meta and (not isinstance(meta[key], str) or not meta[key].strip()):
            raise DataError(f"{meta_file}: field {key!r}: expected a non-empty string, got {show(meta[key])}")
    return meta.get("jinja") or meta.get("name") or template_dir.name.replace("_", " ")


def read_examples(path: Path, task: str, limit: int | None) -> tuple[Example, ...]:
    """The first ``limit`` rows of a JSON-lines file, validated, read through ``datasets`` (streaming)."""
    import datasets

    out = []
    try:
        rows = datasets.load_dataset("json", data_files=[str(path)], split="train", streaming=True)
        for i, row in enumerate(itertools.islice(rows, limit if limit is not None and limit >= 0 else None)):
            where = f"{path}: line {i + 1}"
            for key in ("inputs", "targets"):
                if not isinstance(row.get(key), str):
                    raise DataError(f"{where}: field {key!r}: expected a string, got {show(row.get(key))}")
            choices = row.get("answer_choices") or []
            if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
                raise DataError(f"{where}: field 'answer_choices': expected a list of strings, got {show(choices)}")
            if choices and row["targets"] not in choices:
                raise DataError(
                    f"{where}: field 'targets': {show(row['targets'])} is not among answer_choices {show(choices, 120)}"
                )
            out.append(Example(f"{task}-{path.stem}-{i}", row["inputs"], (row["targets"],), tuple(choices)))
    except DataError:
        raise
    except ValueError as e:  # UnicodeDecodeError; pyarrow.ArrowInvalid (bad JSON lines)
        check_json_lines(path)  # re-read to name the first bad byte or line; datasets' message has neither
        raise DataError(f"{path}: cannot parse JSON lines: {str(e).splitlines()[0]}") from None
    if not out:
        raise DataError(f"{path}: no examples (empty file)")
    return tuple(out)


def load_p3(root: str | Path, cfg: DataConfig, split: str) -> list[Task]:
    root = Path(root)
    if split not in ("train", "test"):
        raise DataError(f"{root}: split must be train or test, got {split!r}")
    if not root.is_dir():
        raise DataError(f"p3:{root}: no such directory")
    tasks = []
    for dataset_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if is_held_out(dataset_dir.name) != (split == "test"):
            continue
        for template_dir in sorted(p for p in dataset_dir.iterdir() if p.is_dir()):
            names = ("train",) if split == "train" else ("validation", "test")
            path = next((template_dir / f"{n}.jsonl" for n in names if (template_dir / f"{n}.jsonl").is_file()), None)
            if path is None:
                continue  # this template has no file for the split (e.g. a test-only dataset)
            name = f"{dataset_dir.name}__{template_dir.name}"
            tasks.append(
                Task(
                    name=name,
                    category=dataset_dir.name,
                    definitions=(_instruction(template_dir),),
                    instances=read_examples(path, name, cfg.max_instances_per_task),
                    source=str(path),
                )
            )
    tasks = select_tasks(
        tasks, categories=cfg.categories, names=cfg.tasks, exclude=cfg.exclude_tasks, where=f"p3:{root}"
    )
    if not tasks:
        which, file = ("MTEST11", "validation") if split == "test" else ("non-MTEST11", "train")
        raise DataError(f"p3:{root}: no {split} tasks ({which} datasets with <dataset>/<template>/{file}.jsonl)")
    return tasks
