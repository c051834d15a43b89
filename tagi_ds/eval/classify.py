"""P3-style evaluation by rank classification: answer options as scored pairs, then accuracy.

Each example with C answer options becomes C *pairs* (same input, one option as the target) in a copy of
its task, so the ordinary evaluation loader batches them (task-grouped; instruction once per task) and the
model scores every pair by the length-normalised log-likelihood of its target. Pairs of one example may land
in different batches or on different ranks: scores are gathered, then grouped back per example here, and
the best option (ties: the first) is the prediction. Accuracy: per prompt (a P3 template is a task), mean
over a dataset's prompts, mean over datasets; on the T0 held-out datasets that mean is MTest11.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from tagi_ds.config import ConfigError
from tagi_ds.data import Example, Task
from tagi_ds.eval.rank import MTEST11, group_argmax, summarize_accuracy

SEP = "::choice"


def pair_id(example_id: str, j: int) -> str:
    return f"{example_id}{SEP}{j}"


def expand_choices(tasks: Sequence[Task]) -> list[Task]:
    """Tasks whose instances are (example, option j) pairs with id ``<id>::choice<j>`` and target option j."""
    out = []
    for task in tasks:
        pairs = []
        for ex in task.instances:
            if not ex.choices:
                raise ConfigError(
                    f"--task rank: example {ex.id!r} of task {task.name!r} has no answer_choices "
                    "(rank classification scores options; use --task generate)"
                )
            if ex.outputs[0] not in ex.choices:
                raise ConfigError(
                    f"--task rank: example {ex.id!r}: answer {ex.outputs[0]!r} is not among its "
                    f"answer_choices {list(ex.choices)!r}"
                )
            pairs.extend(Example(pair_id(ex.id, j), ex.input, (choice,)) for j, choice in enumerate(ex.choices))
        out.append(replace(task, instances=tuple(pairs)))
    return out


def dataset_name(category: str) -> str:
    """A P3 dataset directory -> its MTest11 name (``super_glue_wsc.fixed`` -> ``super_glue_wsc``)."""
    for name in MTEST11:
        if category == name or category.startswith((name + "_", name + ".")):
            return name
    return category


def summarize(tasks: Sequence[Task], scores: Mapping[str, float]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Pair scores (``pair id -> score``) -> prediction records (data order) and the accuracy summary."""
    records, per_prompt = [], defaultdict(dict)
    for task in tasks:
        examples = list(task.instances)
        missing = [
            pair_id(ex.id, j) for ex in examples for j in range(len(ex.choices)) if pair_id(ex.id, j) not in scores
        ]
        if missing:
            raise RuntimeError(f"rank classification: no score for pair {missing[0]!r} (lost in gathering)")
        flat = torch.tensor([scores[pair_id(ex.id, j)] for ex in examples for j in range(len(ex.choices))])
        best = group_argmax(flat, [len(ex.choices) for ex in examples]).tolist()
        correct = 0
        for ex, b in zip(examples, best):
            gold = ex.choices.index(ex.outputs[0])
            correct += b == gold
            records.append(
                {
                    "id": ex.id,
                    "task": task.name,
                    "category": task.category,
                    "prediction": ex.choices[b],
                    "references": list(ex.outputs),
                    "choices": list(ex.choices),
                    "scores": [scores[pair_id(ex.id, j)] for j in range(len(ex.choices))],
                    "correct": b == gold,
                }
            )
        per_prompt[dataset_name(task.category)][task.name] = 100.0 * correct / len(examples)
    held_out = all(name in MTEST11 for name in per_prompt)
    summary = summarize_accuracy(per_prompt, MTEST11 if held_out else sorted(per_prompt))
    summary["mtest11"] = summary["accuracy"] if held_out and summary["complete"] else None
    summary["num_examples"] = len(records)
    return records, summary
