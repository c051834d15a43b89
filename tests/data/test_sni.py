"""The SNI reader on the real sample (../shared/data/sni_sample) and the Tk-Instruct prompt format."""

import json
import shutil

from tagi_ds.config import DataConfig
from tagi_ds.data.prompt import format_concat, format_instance, format_instruction
from tagi_ds.data.sni import read_task
from tagi_ds.data.spec import load_tasks
from tagi_ds.data.task import Demo, Example, Task
from tests.data.conftest import make_cfg


def _cfg(root, **kw) -> DataConfig:
    return DataConfig(spec=f"sni:{root}", **kw)


def test_sample_task_and_instance_counts(sni_sample):
    train = load_tasks(f"sni:{sni_sample}", _cfg(sni_sample), "train")
    test = load_tasks(f"sni:{sni_sample}", _cfg(sni_sample), "test")
    assert (len(train), len(test)) == (24, 12)
    assert sum(len(t.instances) for t in train) == 873
    assert sum(len(t.instances) for t in test) == 402
    assert not {t.name for t in train} & {t.name for t in test}
    task = next(t for t in train if t.name == "task1331_reverse_array")
    assert task.category == "Program Execution" and len(task.instances) == 39
    assert task.instances[0].id == "task1331-17039bd9904c4919bb7ae745e953a270"


def test_def_2pos_prompt_is_the_tk_instruct_format(sni_sample):
    task = read_task(sni_sample / "tasks" / "task1331_reverse_array.json")
    (p1, p2), inst = task.positives[:2], task.instances[0]
    # Brackets count as punctuation, so no "." is appended after the lists (Tk-Instruct's rule).
    expected = (
        f"Definition: {task.definitions[0]}\n\n"
        f" Positive Example 1 -\nInput: {p1.input}\n Output: {p1.output}\n\n"
        f" Positive Example 2 -\nInput: {p2.input}\n Output: {p2.output}\n\n"
        f"Now complete the following example -\nInput: {inst.input}\nOutput: "
    )
    assert format_concat(task, inst.input, "def_pos", 2) == expected
    assert format_instruction(task, "def", 2) == f"Definition: {task.definitions[0]}\n\n"
    for path in sorted((sni_sample / "tasks").glob("*.json")):
        task = read_task(path)
        prompt = format_instruction(task, "def_pos", 2)
        for i, demo in enumerate(task.positives[:2], 1):
            assert f" Positive Example {i} -\nInput: {demo.input.strip()}" in prompt
            assert f"\n Output: {demo.output.strip()}" in prompt
        assert "Positive Example 3" not in prompt


def test_periods_are_added_only_without_final_punctuation():
    task = Task("t", "c", ("Say hi",), (Example("1", "x", ("y",)),), positives=(Demo("a b", "c d"), Demo("e?", "f!")))
    assert format_instruction(task, "def_pos", 2) == (
        "Definition: Say hi.\n\n Positive Example 1 -\nInput: a b.\n Output: c d.\n\n"
        " Positive Example 2 -\nInput: e?\n Output: f!\n\n"
    )
    assert format_instance(" hello ") == "Now complete the following example -\nInput: hello.\nOutput: "


def test_concat_batch_holds_the_def_2pos_prompt(sni_sample, tok):
    from tagi_ds.data.loader import build_eval_loader

    cfg = make_cfg(
        "tiny",
        "mode=concat",
        "data.setting=def_pos",
        f"data.spec=sni:{sni_sample}",
        "data.max_instruction_length=1024",
        "data.max_source_length=1024",
    )
    tasks = [t for t in load_tasks(cfg.data.spec, cfg.data, "train") if t.name == "task1331_reverse_array"]
    batch = next(iter(build_eval_loader(cfg, tok, tasks=tasks, batch_size=2)))
    assert batch.instr_input_ids is None
    text = tok.decode(batch.input_ids[0].tolist())
    want = format_concat(tasks[0], tasks[0].instances[0].input, "def_pos", 2)
    assert " ".join(text.split()) == " ".join(want.split())  # sentencepiece folds newlines into spaces


def test_filters_english_categories_excluded_max_instances(sni_sample, tmp_path):
    root = tmp_path / "sni"
    shutil.copytree(sni_sample, root)
    path = root / "tasks" / "task1331_reverse_array.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["Input_language"] = ["Spanish"]
    path.write_text(json.dumps(data), encoding="utf-8")
    spec = f"sni:{root}"
    assert len(load_tasks(spec, _cfg(root), "train")) == 23
    assert len(load_tasks(spec, _cfg(root, english_only=False), "train")) == 24
    program = load_tasks(spec, _cfg(root, categories=["Program Execution"]), "train")
    assert {t.name[:7] for t in program} == {"task063", "task119", "task376", "task161", "task505"}
    (root / "splits" / "default" / "excluded_tasks.txt").write_text("task376_reverse_order_of_words\n")
    assert len(load_tasks(spec, _cfg(root), "train")) == 22
    full = {t.name: t for t in load_tasks(spec, _cfg(root, max_instances_per_task=1000), "test")}
    for t in load_tasks(spec, _cfg(root, max_instances_per_task=5), "test"):
        assert t.instances == full[t.name].instances[:5]  # test: the first (official) instances
    train_full = {t.name: t for t in load_tasks(spec, _cfg(root, max_instances_per_task=1000), "train")}
    sampled = load_tasks(spec, _cfg(root, max_instances_per_task=5), "train")
    assert sampled == load_tasks(spec, _cfg(root, max_instances_per_task=5), "train")
    for t in sampled:
        order = [ex.id for ex in train_full[t.name].instances]
        ids = [ex.id for ex in t.instances]
        assert len(ids) == min(5, len(order)) and ids == sorted(ids, key=order.index)
    assert any([ex.id for ex in t.instances] != [ex.id for ex in train_full[t.name].instances[:5]] for t in sampled)
