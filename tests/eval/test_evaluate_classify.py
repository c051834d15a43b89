"""Rank-classification bookkeeping: options as pairs, scores grouped back per example, accuracy aggregation."""

import pytest

from tagi_ds.config import ConfigError
from tagi_ds.data import Example, Task
from tagi_ds.eval.classify import dataset_name, expand_choices, pair_id, summarize


def task(name, dataset, examples):
    return Task(name=name, category=dataset, definitions=("d",), instances=tuple(examples))


def ex(i, gold, choices):
    return Example(f"{i}", f"input {i}", (gold,), tuple(choices))


def test_pairs_keep_example_order_and_choice_order():
    (t,) = expand_choices([task("rte__p", "super_glue_rte", [ex("a", "no", ["yes", "no"]), ex("b", "x", "xyz")])])
    assert [(p.id, p.input, p.outputs) for p in t.instances] == [
        ("a::choice0", "input a", ("yes",)),
        ("a::choice1", "input a", ("no",)),
        ("b::choice0", "input b", ("x",)),
        ("b::choice1", "input b", ("y",)),
        ("b::choice2", "input b", ("z",)),
    ]


@pytest.mark.parametrize(
    "bad, message",
    [
        (ex("a", "yes", []), "has no answer_choices"),
        (ex("a", "maybe", ["yes", "no"]), "is not among its answer_choices"),
    ],
)
def test_examples_that_cannot_be_ranked_are_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        expand_choices([task("t", "d", [bad])])


def test_summary_groups_scores_per_example_and_averages_prompts_then_datasets():
    tasks = [
        task("rte__p1", "super_glue_rte", [ex("a", "yes", ["yes", "no"]), ex("b", "no", ["yes", "no"])]),
        task("rte__p2", "super_glue_rte", [ex("c", "no", ["yes", "no"])]),
        task("sc__p", "story_cloze_2016", [ex("d", "B", ["A", "B", "C"])]),
    ]
    scores = {
        pair_id("a", 0): -1.0,
        pair_id("a", 1): -2.0,  # a: yes (right)
        pair_id("b", 0): -0.5,
        pair_id("b", 1): -0.5,  # b: a tie -> the first option, yes (wrong)
        pair_id("c", 0): -3.0,
        pair_id("c", 1): -0.1,  # c: no (right)
        pair_id("d", 0): -2.0,
        pair_id("d", 1): -1.0,
        pair_id("d", 2): -1.5,
    }  # d: B (right)
    records, summary = summarize(tasks, scores)
    assert [(r["id"], r["prediction"], r["correct"]) for r in records] == [
        ("a", "yes", True),
        ("b", "yes", False),
        ("c", "no", True),
        ("d", "B", True),
    ]
    assert summary["per_prompt"] == {
        "story_cloze": {"sc__p": 100.0},
        "super_glue_rte": {"rte__p1": 50.0, "rte__p2": 100.0},
    }
    assert summary["per_dataset"] == {"super_glue_rte": 75.0, "story_cloze": 100.0}
    assert summary["accuracy"] == 87.5 and summary["num_examples"] == 4
    assert summary["mtest11"] is None and "anli_r1" in summary["missing"]  # 2 of the 11 held-out datasets
    with pytest.raises(RuntimeError, match="no score for pair 'd::choice2'"):
        summarize(tasks, {k: v for k, v in scores.items() if k != pair_id("d", 2)})


def test_dataset_names():
    assert dataset_name("super_glue_wsc.fixed") == "super_glue_wsc"
    assert dataset_name("winogrande_winogrande_xl") == "winogrande"
    assert dataset_name("anli_r1") == "anli_r1"
    assert dataset_name("ag_news") == "ag_news"  # not held out: its own name (mean over what was evaluated)
