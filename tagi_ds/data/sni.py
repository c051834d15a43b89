"""Super-NaturalInstructions on-disk layout: read it (real SNI, the sample) and write it (the built-in suite).

Layout (as upstream allenai/natural-instructions)::

    DIR/tasks/<task_name>.json          Definition: [str], Positive/Negative Examples: [{input, output,
                                        explanation}], Instances: [{id, input, output: [str, ...]}],
                                        Categories: [str], Input_language / Output_language /
                                        Instruction_language: [str], ... (other fields are ignored)
    DIR/splits/default/train_tasks.txt  one task name per line
    DIR/splits/default/test_tasks.txt
    DIR/splits/default/excluded_tasks.txt   (optional) removed from both splits

Every malformed field raises a one-line ``DataError`` naming the file, the field and the value.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tagi_ds.config import DataConfig
from tagi_ds.data.task import DataError, Demo, Example, Task, note, select_tasks, show
from tagi_ds.files import atomic_write, read_json, read_text

SPLITS = ("train", "test")
LANGUAGE_FIELDS = ("Input_language", "Output_language", "Instruction_language")


def _strings(path: Path, field: str, value: Any, *, allow_empty_list: bool = False) -> list[str]:
    if not isinstance(value, list) or (not value and not allow_empty_list):
        raise DataError(f"{path}: field {field}: expected a non-empty list of strings, got {show(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise DataError(f"{path}: field {field}[{i}]: expected a non-empty string, got {show(item)}")
    return value


def _demos(path: Path, field: str, value: Any) -> tuple[Demo, ...]:
    if not isinstance(value, list):
        raise DataError(f"{path}: field {field}: expected a list, got {show(value)}")
    demos = []
    for i, d in enumerate(value):
        if not isinstance(d, dict):
            raise DataError(f"{path}: field {field}[{i}]: expected an object, got {show(d)}")
        for key in ("input", "output"):
            if not isinstance(d.get(key), str):
                raise DataError(f"{path}: field {field}[{i}].{key}: expected a string, got {show(d.get(key))}")
        demos.append(Demo(d["input"], d["output"], d.get("explanation", "") or ""))
    return tuple(demos)


def _instances(path: Path, value: Any) -> tuple[Example, ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{path}: field Instances: expected a non-empty list, got {show(value)}")
    out, seen = [], set()
    for j, inst in enumerate(value):
        where = f"{path}: field Instances[{j}]"
        if not isinstance(inst, dict):
            raise DataError(f"{where}: expected an object, got {show(inst)}")
        iid, text, outputs = inst.get("id"), inst.get("input"), inst.get("output")
        if not isinstance(iid, str) or not iid:
            raise DataError(f"{where}.id: expected a non-empty string, got {show(iid)}")
        if iid in seen:
            raise DataError(f"{where}.id: duplicate id {show(iid)}")
        seen.add(iid)
        if not isinstance(text, str):
            raise DataError(f"{where}.input: expected a string, got {show(text)}")
        if not isinstance(outputs, list) or not outputs:
            raise DataError(f"{where}.output: expected a non-empty list of strings, got {show(outputs)}")
        if not all(isinstance(o, str) for o in outputs):
            raise DataError(f"{where}.output: expected strings, got {show(outputs)}")
        out.append(Example(iid, text, tuple(outputs)))
    return tuple(out)


def is_english(data: dict) -> bool:
    """All language fields present say exactly ["English"] (the English track of the paper)."""
    return all(data.get(f, ["English"]) == ["English"] for f in LANGUAGE_FIELDS)


def read_task(path: str | Path, english_only: bool = False) -> Task | None:
    """One ``tasks/<name>.json`` file as a Task (None when ``english_only`` filters it out)."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    for required in ("Definition", "Instances"):
        if required not in data:
            raise DataError(f"{path}: missing field {required!r}")
    if english_only and not is_english(data):
        return None
    definition = data["Definition"]
    definitions = _strings(path, "Definition", [definition] if isinstance(definition, str) else definition)
    categories = _strings(path, "Categories", data.get("Categories", ["Uncategorized"]))
    return Task(
        name=path.stem,
        category=categories[0],
        definitions=tuple(definitions),
        instances=_instances(path, data["Instances"]),
        positives=_demos(path, "Positive Examples", data.get("Positive Examples", [])),
        negatives=_demos(path, "Negative Examples", data.get("Negative Examples", [])),
        source=str(path),
    )


def _split_lines(root: Path, split: str) -> list[tuple[int, str]]:
    """(line number, task name) of ``splits/default/<split>_tasks.txt`` minus ``excluded_tasks.txt``."""
    split_file = root / "splits" / "default" / f"{split}_tasks.txt"
    if not split_file.is_file():
        raise DataError(f"{split_file}: split file missing (SNI layout: splits/default/{split}_tasks.txt)")
    excluded_file = split_file.with_name("excluded_tasks.txt")
    excluded = set(read_text(excluded_file).split()) if excluded_file.is_file() else set()
    lines = ((lineno, line.strip()) for lineno, line in enumerate(read_text(split_file).splitlines(), 1))
    return [(lineno, name) for lineno, name in lines if name and not name.startswith("#") and name not in excluded]


def split_names(root: str | Path, split: str) -> list[str]:
    """Task names of ``split`` (train | test) minus ``excluded_tasks.txt``; every name must have a file, and
    no task may be in both splits (a test task seen in training would score as "unseen" while it was not)."""
    root = Path(root)
    if split not in SPLITS:
        raise DataError(f"{root}: split must be one of {', '.join(SPLITS)}, got {split!r}")
    split_file = root / "splits" / "default" / f"{split}_tasks.txt"
    lines = _split_lines(root, split)
    for lineno, name in lines:
        if not (root / "tasks" / f"{name}.json").is_file():
            raise DataError(f"{split_file}: line {lineno}: task {name!r} has no file tasks/{name}.json")
    other = "test" if split == "train" else "train"
    if split_file.with_name(f"{other}_tasks.txt").is_file():  # this split is read already; read the other one
        test_lines, train_lines = (
            (lines, _split_lines(root, other)) if split == "test" else (_split_lines(root, other), lines)
        )
        train = {name for _, name in train_lines}
        test_file = split_file.with_name("test_tasks.txt")
        for lineno, name in test_lines:
            if name in train:
                raise DataError(
                    f"{test_file}: line {lineno}: task {name!r} is also in train_tasks.txt (a test "
                    "task must be unseen in training: remove it from one split or list it in "
                    "excluded_tasks.txt)"
                )
    return [name for _, name in lines]


def load_sni(root: str | Path, cfg: DataConfig, split: str) -> list[Task]:
    """The tasks of ``split`` after the English / category / max-instances filters of ``cfg``."""
    root = Path(root)
    tasks, names = [], split_names(root, split)
    for name in names:
        task = read_task(root / "tasks" / f"{name}.json", english_only=cfg.english_only)
        if task is not None:
            tasks.append(task)
    dropped = sorted(set(names) - {t.name for t in tasks})
    if dropped:
        note(
            f"{root}: data.english_only=true dropped {len(dropped)} of {len(names)} {split} tasks "
            "(a language field other than English); --set data.english_only=false keeps them"
        )
        # a data.tasks name that the language filter removed is not "missing from the split": say what removed it
        named = sorted(set(cfg.tasks) & set(dropped))
        if named:
            raise DataError(
                f"{root}: data.tasks names {show(named, 200)}, dropped by data.english_only=true "
                "(a language other than English); --set data.english_only=false keeps it"
            )
    tasks = select_tasks(
        tasks,
        categories=cfg.categories,
        names=cfg.tasks,
        exclude=cfg.exclude_tasks,
        max_instances=cfg.max_instances_per_task,
        sample_seed="sni" if split == "train" else None,
        where=str(root),
    )
    if not tasks:  # only reachable when no task survived the language filter or the split lists none
        why = (
            f"data.english_only=true dropped all {len(names)} (--set data.english_only=false keeps them)"
            if names
            else f"splits/default/{split}_tasks.txt lists none (after excluded_tasks.txt)"
        )
        raise DataError(f"{root}: split {split!r} has no tasks: {why}")
    return tasks


def task_to_json(task: Task) -> dict:
    """The SNI file content of a task (upstream key order)."""
    if any(ex.choices for ex in task.instances):
        raise DataError(f"{task.name}: answer choices (P3) have no field in the SNI layout")
    demo = lambda d: {"input": d.input, "output": d.output, "explanation": d.explanation}
    return {
        "Contributors": [],
        "Source": ["tagi-ds"],
        "Categories": [task.category],
        "Reasoning": [],
        "Definition": list(task.definitions),
        "Input_language": ["English"],
        "Output_language": ["English"],
        "Instruction_language": ["English"],
        "Domains": [],
        "Positive Examples": [demo(d) for d in task.positives],
        "Negative Examples": [demo(d) for d in task.negatives],
        "Instances": [{"id": ex.id, "input": ex.input, "output": list(ex.outputs)} for ex in task.instances],
    }


def write_sni(out_dir: str | Path, train: Sequence[Task], test: Sequence[Task]) -> Path:
    """Write tasks in the SNI layout; every file written whole (``tagi_ds.files.atomic_write``). Returns ``out_dir``."""
    out_dir = Path(out_dir)
    names = [t.name for t in (*train, *test)]
    if len(set(names)) != len(names):
        raise DataError(f"{out_dir}: duplicate task names {sorted({n for n in names if names.count(n) > 1})}")
    files = {f"tasks/{t.name}.json": task_to_json(t) for t in (*train, *test)}  # validate all before writing
    for rel, obj in files.items():
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / rel, json.dumps(obj, ensure_ascii=False, indent=4) + "\n")  # as the SNI sample
    (out_dir / "splits" / "default").mkdir(parents=True, exist_ok=True)
    for split, tasks in (("train", train), ("test", test), ("excluded", ())):
        atomic_write(out_dir / "splits" / "default" / f"{split}_tasks.txt", "".join(f"{t.name}\n" for t in tasks))
    return out_dir
