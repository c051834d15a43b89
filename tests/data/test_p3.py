"""The P3 reader on a tiny P3 directory built in tmp: templates as tasks, MTest11 held out."""

import json

import pytest

from tagi_ds.config import DataConfig
from tagi_ds.data.loader import build_eval_loader, build_train_loader
from tagi_ds.data.p3 import MTEST11, is_held_out
from tagi_ds.data.spec import load_tasks, teacher_rows
from tests.data.conftest import make_cfg


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture()
def p3(tmp_path):
    root = tmp_path / "p3"
    topics = ["World", "Sports", "Business"]
    for template in ("classify_question_first", "which_section"):
        rows = [
            {"inputs": f"Headline {i}: what is the topic?", "targets": topics[i % 3], "answer_choices": topics}
            for i in range(10)
        ]
        write(root / "ag_news" / template / "train.jsonl", rows)
    (root / "ag_news" / "which_section" / "template.json").write_text(
        json.dumps({"name": "which_section", "jinja": "{{text}} Which section of a newspaper? ||| {{label}}"})
    )
    write(
        root / "xsum" / "summarize" / "train.jsonl",
        [{"inputs": f"Article {i}. Summarize:", "targets": f"Summary {i}"} for i in range(6)],
    )
    rte = [
        {
            "inputs": f"Premise {i}. Does it follow?",
            "targets": "yes" if i % 2 else "no",
            "answer_choices": ["yes", "no"],
        }
        for i in range(5)
    ]
    write(root / "super_glue_rte" / "GPT_3_style" / "validation.jsonl", rte)
    write(root / "super_glue_rte" / "GPT_3_style" / "train.jsonl", rte)  # never used: held out
    write(
        root / "story_cloze_2016" / "choose_ending" / "validation.jsonl",
        [{"inputs": "Story. Ending?", "targets": "B", "answer_choices": ["A", "B"]}],
    )
    return root


def test_mtest11_names():
    assert MTEST11 == (
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
    assert is_held_out("super_glue_wsc.fixed") and is_held_out("winogrande_winogrande_xl")
    assert not is_held_out("super_glue_boolq") and not is_held_out("anli")


def test_templates_are_tasks_and_mtest11_is_held_out(p3):
    train = load_tasks(f"p3:{p3}", DataConfig(), "train")
    assert [t.name for t in train] == ["ag_news__classify_question_first", "ag_news__which_section", "xsum__summarize"]
    by_name = {t.name: t for t in train}
    assert by_name["ag_news__which_section"].definitions == ("{{text}} Which section of a newspaper? ||| {{label}}",)
    assert by_name["ag_news__classify_question_first"].definitions == ("classify question first",)
    ex = by_name["ag_news__which_section"].instances[1]
    assert ex.outputs == ("Sports",) and ex.choices == ("World", "Sports", "Business")
    assert by_name["xsum__summarize"].instances[0].choices == ()
    assert teacher_rows(train, "category") == {"ag_news": 0, "xsum": 1}
    test = load_tasks(f"p3:{p3}", DataConfig(max_instances_per_task=3), "test")
    assert [(t.name, t.category, len(t.instances)) for t in test] == [
        ("story_cloze_2016__choose_ending", "story_cloze_2016", 1),
        ("super_glue_rte__GPT_3_style", "super_glue_rte", 3),
    ]
    assert test[1].instances[0].id == "super_glue_rte__GPT_3_style-validation-0"


def test_p3_batches(p3, tok):
    cfg = make_cfg("tiny", f"data.spec=p3:{p3}", "data.examples_per_task=2")
    b = next(build_train_loader(cfg, tok, "finetune"))
    assert b.num_tasks <= 2 and b.instr_input_ids.shape[0] == b.num_tasks
    assert tok.decode(b.instr_input_ids[0].tolist()).startswith("Definition:")
    ev = list(build_eval_loader(cfg, tok))
    assert sum(len(x.example_ids) for x in ev) == 6
