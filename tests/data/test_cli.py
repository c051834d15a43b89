"""``python -m tagi_ds.data``: the inspection tables, and errors as one line with exit status 2."""

import subprocess
import sys

from tagi_ds.data.__main__ import main
from tests.train.harness import HANG_S


def test_builtin_summary(capsys, tmp_path):
    assert main(["--data", "builtin", "--max-rows", "3", "--write-sni", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "train: 76 tasks, 7600 instances" in out and "test: 29 tasks, 1450 instances" in out
    for needle in (
        "categories",
        "token lengths",
        "instruction (per task)",
        "concat prompt",
        "p90",
        "task001_words_copy",
        "Arithmetic",
    ):
        assert needle in out
    assert len(list((tmp_path / "out" / "tasks").glob("*.json"))) == 105


def test_sni_sample_and_corpus(capsys, sni_sample, tmp_path):
    assert main(["--data", f"sni:{sni_sample}", "--split", "test", "--set", "data.setting=def_pos"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps titles to the console width (80 off a TTY)
    assert "test: 12 tasks, 402 instances" in out and "setting def_pos" in out
    (tmp_path / "c.txt").write_text("one document\nanother document\n")
    assert main(["--data", f"text:{tmp_path / 'c.txt'}"]) == 0
    assert "2 documents" in capsys.readouterr().out


def test_errors_are_one_line_with_status_2():
    proc = subprocess.run(
        [sys.executable, "-m", "tagi_ds.data", "--data", "s3://bucket/sni"],
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: data spec 's3://bucket/sni': unknown scheme 's3'; "
        "expected builtin | sni:DIR | p3:DIR | text:FILE_OR_DIR"
    ]


def test_english_only_says_what_it_dropped_and_which_flag_keeps_it(capsys, tmp_path):
    import json

    root = tmp_path / "sni"
    (root / "tasks").mkdir(parents=True)
    (root / "splits" / "default").mkdir(parents=True)
    task = {
        "Definition": ["Copy the input."],
        "Categories": ["Misc."],
        "Instances": [{"id": "x-0", "input": "a b", "output": ["a b"]}],
    }
    for name, lang in (("task001_en", "English"), ("task002_de", "German")):
        inst = [{**task["Instances"][0], "id": f"{name}-0"}]
        (root / "tasks" / f"{name}.json").write_text(json.dumps({**task, "Input_language": [lang], "Instances": inst}))
    (root / "splits" / "default" / "train_tasks.txt").write_text("task001_en\ntask002_de\n")
    assert main(["--data", f"sni:{root}", "--split", "train"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "data.english_only=true dropped 1 of 2 train tasks" in out
    assert "--set data.english_only=false keeps them" in out and "train: 1 tasks" in out
    assert main(["--data", f"sni:{root}", "--split", "train", "--set", "data.english_only=false"]) == 0
    out = capsys.readouterr().out
    assert "dropped" not in out and "train: 2 tasks" in out


def _two_task_sni(root, train: str, test: str, german: str = "task002_de"):
    import json

    (root / "tasks").mkdir(parents=True)
    (root / "splits" / "default").mkdir(parents=True)
    for name in ("task001_en", "task002_de", "task003_en"):
        lang = "German" if name == german else "English"
        (root / "tasks" / f"{name}.json").write_text(
            json.dumps(
                {
                    "Definition": ["Copy the input."],
                    "Categories": ["Misc."],
                    "Input_language": [lang],
                    "Instances": [{"id": f"{name}-0", "input": "a b", "output": ["a b"]}],
                }
            )
        )
    (root / "splits" / "default" / "train_tasks.txt").write_text(train)
    (root / "splits" / "default" / "test_tasks.txt").write_text(test)


def test_a_task_in_both_splits_is_refused_naming_the_test_line(capsys, tmp_path):
    root = tmp_path / "sni"
    _two_task_sni(root, train="task001_en\ntask003_en\n", test="task002_de\ntask003_en\n")
    for split in ("train", "test"):  # either split alone already refuses: training on a test task is the harm
        assert main(["--data", f"sni:{root}", "--split", split, "--set", "data.english_only=false"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"error: {root}/splits/default/test_tasks.txt: line 2: task 'task003_en' is also in "
            "train_tasks.txt (a test task must be unseen in training: remove it from one split or list it "
            "in excluded_tasks.txt)"
        ], err
    (root / "splits" / "default" / "excluded_tasks.txt").write_text("task003_en\n")
    assert main(["--data", f"sni:{root}", "--split", "all", "--set", "data.english_only=false"]) == 0


def test_a_data_tasks_name_dropped_by_the_language_filter_is_blamed_on_it_and_no_other(capsys, tmp_path):
    root = tmp_path / "sni"
    _two_task_sni(root, train="task001_en\ntask002_de\n", test="task003_en\n")
    assert main(["--data", f"sni:{root}", "--split", "train", "--set", 'data.tasks=["task002_de"]']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {root}: data.tasks names ['task002_de'], dropped by data.english_only=true (a language "
        "other than English); --set data.english_only=false keeps it"
    ], err
    # a name that is simply not in the split says that, and does not mention the language filter
    assert main(["--data", f"sni:{root}", "--split", "train", "--set", 'data.tasks=["task003_en"]']) == 2
    err = capsys.readouterr().err
    assert "not a task of this split" in err and "english_only" not in err
    # an empty split says the split file lists none, not that english_only dropped them
    (root / "splits" / "default" / "test_tasks.txt").write_text("# none yet\n")
    assert main(["--data", f"sni:{root}", "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "test_tasks.txt lists none" in err and "english_only" not in err
