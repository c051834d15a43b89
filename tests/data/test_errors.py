"""Bad input: every case raises a one-line DataError naming the file, the field and the value; nothing
is written."""

import json
import os

import pytest

from tagi_ds import files
from tagi_ds.config import DataConfig
from tagi_ds.data.corpus import corpus_files, iter_documents, load_windows
from tagi_ds.data.p3 import load_p3
from tagi_ds.data.sni import load_sni, write_sni
from tagi_ds.data.spec import load_tasks, parse_spec
from tagi_ds.data.task import DataError, Example, Task
from tagi_ds.data.tokenizer import train_sentencepiece

GOOD = {
    "Definition": ["Copy the input."],
    "Categories": ["Misc."],
    "Input_language": ["English"],
    "Positive Examples": [{"input": "a", "output": "a", "explanation": "same"}],
    "Instances": [{"id": "t1-0", "input": "a b", "output": ["a b"]}, {"id": "t1-1", "input": "c", "output": ["c"]}],
}


def sni_dir(tmp_path, task=None, raw: bytes | None = None, train=("task001_copy",)):
    root = tmp_path / "sni"
    (root / "tasks").mkdir(parents=True)
    (root / "splits" / "default").mkdir(parents=True)
    path = root / "tasks" / "task001_copy.json"
    path.write_bytes(raw if raw is not None else json.dumps(task if task is not None else GOOD).encode())
    (root / "splits" / "default" / "train_tasks.txt").write_text("".join(f"{n}\n" for n in train))
    return root


def expect(fn, *needles):
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert str(needle) in msg, (needle, msg)
    return msg


def load(root):
    return load_sni(root, DataConfig(), "train")


def with_field(**changes):
    task = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is KeyError:
            del task[key]
        else:
            task[key] = value
    return task


def test_valid_minimal_task_loads(tmp_path):
    assert [len(t.instances) for t in load(sni_dir(tmp_path))] == [2]


def test_malformed_json(tmp_path):
    root = sni_dir(tmp_path, raw=b'{"Definition": ["x"],\n "Instances": [}')
    expect(lambda: load(root), "task001_copy.json", "invalid JSON", "line 2")


def test_missing_definition(tmp_path):
    root = sni_dir(tmp_path, with_field(Definition=KeyError))
    expect(lambda: load(root), "task001_copy.json", "'Definition'")


def test_missing_instances(tmp_path):
    root = sni_dir(tmp_path, with_field(Instances=KeyError))
    expect(lambda: load(root), "task001_copy.json", "'Instances'")


def test_empty_definition(tmp_path):
    root = sni_dir(tmp_path, with_field(Definition=[]))
    expect(lambda: load(root), "task001_copy.json", "field Definition", "[]")


def test_non_string_definition(tmp_path):
    root = sni_dir(tmp_path, with_field(Definition=["ok", 7]))
    expect(lambda: load(root), "task001_copy.json", "field Definition[1]", "7")


def test_output_not_a_list(tmp_path):
    root = sni_dir(tmp_path, with_field(Instances=[{"id": "t1-0", "input": "a", "output": "a"}]))
    expect(lambda: load(root), "task001_copy.json", "Instances[0].output", "'a'")


def test_output_empty(tmp_path):
    root = sni_dir(tmp_path, with_field(Instances=[{"id": "t1-0", "input": "a", "output": []}]))
    expect(lambda: load(root), "task001_copy.json", "Instances[0].output", "[]")


def test_positive_example_without_output(tmp_path):
    root = sni_dir(tmp_path, with_field(**{"Positive Examples": [{"input": "a"}]}))
    expect(lambda: load(root), "task001_copy.json", "Positive Examples[0].output", "None")


def test_split_names_a_task_with_no_file(tmp_path):
    root = sni_dir(tmp_path, train=("task001_copy", "task999_ghost"))
    expect(lambda: load(root), "train_tasks.txt", "line 2", "task999_ghost")


def test_duplicate_instance_ids_in_a_file(tmp_path):
    inst = [{"id": "t1-0", "input": "a", "output": ["a"]}, {"id": "t1-0", "input": "b", "output": ["b"]}]
    root = sni_dir(tmp_path, with_field(Instances=inst))
    expect(lambda: load(root), "task001_copy.json", "Instances[1].id", "duplicate", "'t1-0'")


def test_duplicate_instance_ids_across_tasks(tmp_path):
    root = sni_dir(tmp_path, train=("task001_copy", "task002_copy"))
    (root / "tasks" / "task002_copy.json").write_text(json.dumps(GOOD))
    expect(lambda: load(root), "task002_copy.json", "duplicate id", "'t1-0'", "task001_copy")


def test_non_utf8_task_file(tmp_path):
    root = sni_dir(tmp_path, raw=json.dumps(GOOD).encode().replace(b"Copy", b"C\xffpy"))
    expect(lambda: load(root), "task001_copy.json", "not UTF-8", "0xff")


def test_missing_split_file(tmp_path):
    root = sni_dir(tmp_path)
    expect(lambda: load_sni(root, DataConfig(), "test"), "test_tasks.txt", "missing")


def test_categories_matching_nothing(tmp_path):
    root = sni_dir(tmp_path)
    expect(lambda: load_sni(root, DataConfig(categories=["Nope"]), "train"), "'Nope'", "Misc.")


def test_non_utf8_corpus_file(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"fine line\nbad \xfe\xff line\n")
    expect(lambda: list(iter_documents([path])), "c.txt", "not UTF-8", "0xfe", "offset 14")


def test_empty_corpus(tmp_path, tok):
    path = tmp_path / "empty.txt"
    path.write_text("\n  \n\n")
    expect(lambda: load_windows(path, tok, 96), "empty.txt", "empty corpus")


def test_corpus_jsonl_without_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "a doc"}\n{"body": "no text"}\n')
    expect(lambda: list(iter_documents([path])), "docs.jsonl", "line 2", "'text'", "None")


def test_corpus_directory_without_corpus_files(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    expect(lambda: corpus_files(tmp_path), str(tmp_path), "no corpus files")


def p3_dir(tmp_path, rows: list[dict] | str):
    d = tmp_path / "p3" / "ag_news" / "classify"
    d.mkdir(parents=True)
    text = rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows)
    (d / "train.jsonl").write_text(text)
    return tmp_path / "p3"


def test_p3_target_not_among_answer_choices(tmp_path):
    root = p3_dir(
        tmp_path,
        [
            {"inputs": "news?", "targets": "Sports", "answer_choices": ["World", "Sports"]},
            {"inputs": "news?", "targets": "Cooking", "answer_choices": ["World", "Sports"]},
        ],
    )
    expect(lambda: load_p3(root, DataConfig(), "train"), "train.jsonl", "line 2", "'targets'", "'Cooking'")


def test_p3_missing_inputs(tmp_path):
    root = p3_dir(tmp_path, [{"targets": "World", "answer_choices": ["World"]}])
    expect(lambda: load_p3(root, DataConfig(), "train"), "train.jsonl", "line 1", "'inputs'", "None")


def test_p3_malformed_json_lines(tmp_path):
    root = p3_dir(tmp_path, '{"inputs": "a", "targets": "b"}\n{"inputs": "a",\n')
    expect(lambda: load_p3(root, DataConfig(), "train"), "train.jsonl", "line 2", "invalid JSON")


def test_unknown_spec_scheme():
    expect(lambda: parse_spec("hf:allenai/sni"), "'hf:allenai/sni'", "unknown scheme 'hf'", "sni:DIR")
    expect(lambda: parse_spec("bogus"), "unknown scheme 'bogus'")


def test_spec_path_missing(tmp_path):
    expect(lambda: parse_spec(f"sni:{tmp_path}/nowhere"), "nowhere", "does not exist")


def test_text_spec_has_no_tasks(tmp_path):
    (tmp_path / "c.txt").write_text("hello\n")
    expect(lambda: load_tasks(f"text:{tmp_path / 'c.txt'}", DataConfig(), "train"), "pretraining corpus")


def test_writer_validates_everything_before_writing(tmp_path):
    good = Task("task1", "c", ("d",), (Example("1", "x", ("y",)),))
    p3_like = Task("task2", "c", ("d",), (Example("2", "x", ("y",), choices=("y", "n")),))
    out = tmp_path / "out"
    expect(lambda: write_sni(out, [good], [p3_like]), "task2", "answer choices")
    expect(lambda: write_sni(out, [good], [good]), "duplicate task names", "task1")
    assert not out.exists()


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError):
        files.atomic_write(tmp_path / "x.json", "{}")
    assert os.listdir(tmp_path) == []


def test_tokenizer_training_on_empty_corpus():
    expect(lambda: train_sentencepiece(["", "   "]), "tokenizer training", "empty corpus")


def test_task_name_filters_and_their_errors():
    """data.tasks keeps only the named tasks; data.exclude_tasks drops names (those of the other split are
    ignored, so one config serves train and test); an unknown or emptying choice is one clear line."""
    train = load_tasks("builtin", DataConfig(), "train")
    test = load_tasks("builtin", DataConfig(), "test")
    val = [t.name for t in train[:3]]
    kept = load_tasks("builtin", DataConfig(tasks=val), "train")
    assert [t.name for t in kept] == val
    rest = load_tasks("builtin", DataConfig(exclude_tasks=val), "train")
    assert len(rest) == len(train) - 3 and not {t.name for t in rest} & set(val)
    assert len(load_tasks("builtin", DataConfig(exclude_tasks=val), "test")) == len(test)  # other split: ignored
    # A run trained without the validation tasks is evaluated on them by naming them: data.tasks wins.
    both = load_tasks("builtin", DataConfig(tasks=val, exclude_tasks=val), "train")
    assert [t.name for t in both] == val
    expect(
        lambda: load_tasks("builtin", DataConfig(tasks=[val[0], "task999_nope"]), "train"),
        "data.tasks",
        "'task999_nope'",
        "not a task of this split",
    )
    expect(
        lambda: load_tasks("builtin", DataConfig(exclude_tasks=[t.name for t in test]), "test"),
        "data.exclude_tasks",
        "leaves no task",
    )


def test_dev_split_only_for_builtin(tmp_path):
    root = sni_dir(tmp_path)
    expect(
        lambda: load_tasks(f"sni:{root}", DataConfig(), "dev"),
        "split dev exists only for the built-in suite",
        "data.exclude_tasks",
    )
    expect(lambda: load_tasks("builtin", DataConfig(), "valid"), "split must be train, dev or test", "'valid'")
