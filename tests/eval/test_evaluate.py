"""launchers/evaluate.py end to end: one process vs 2 ZeRO-3 ranks, rank classification, bad input."""

import contextlib
import importlib.util
import io
import json
import subprocess
import sys

import pytest
import torch

from tagi_ds import artifacts
from tagi_ds.cli import guarded
from tagi_ds.model import build_backbone, build_model
from tests.core.helpers import perturb, tiny_cfg
from tests.train.harness import HANG_S, REPO, check, env, launch, partitioned_z3

SMALL = ["--max_new_tokens", "6", "--set", "data.max_instances_per_task=2"]


def load_launcher(script: str):
    spec = importlib.util.spec_from_file_location(f"launcher_{script[:-3]}", REPO / "launchers" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(script: str, argv: list[str]) -> str:
    """Run a launcher's main in this process as ``guarded`` does; expect exit code 2, return stderr."""
    module = load_launcher(script)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        guarded(lambda: module.main(argv))
    assert exit_info.value.code == 2, err.getvalue()
    return err.getvalue()


def evaluate(args: list[str], nprocs: int | None = None) -> subprocess.CompletedProcess:
    """One plain process (``python launchers/evaluate.py``) or ``nprocs`` ranks through the deepspeed launcher."""
    if nprocs is not None:
        return check(launch("evaluate.py", nprocs, args))
    cmd = [sys.executable, str(REPO / "launchers" / "evaluate.py"), *args]
    return check(subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=HANG_S))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def hypernet(tmp_path_factory):
    """A tiny T5 hypernet/ dir whose generator's head_B is not zero (generated deltas matter)."""
    cfg = tiny_cfg("tiny")
    torch.manual_seed(0)
    model = build_model(cfg, "finetune", build_backbone(cfg))
    perturb(model)
    path = tmp_path_factory.mktemp("hn") / "hypernet"
    artifacts.save_hypernet(model, path)
    return path


@pytest.mark.distributed
def test_two_zero3_ranks_write_the_same_predictions_as_one_process(tmp_path, hypernet):
    # 58 examples in batches of 9: 7 batches, so rank 1 repeats one that rank 0 ran (de-duplicated by id).
    # model.init_seed=8: a random tiny backbone that does not repeat one token for every input.
    common = [
        "--hypernet",
        str(hypernet),
        "--deepspeed",
        partitioned_z3(tmp_path),
        "--seed",
        "2",
        "--batch_size",
        "9",
        *SMALL,
        "model.init_seed=8",
    ]
    evaluate([*common, "--output_dir", str(tmp_path / "one")])
    proc = evaluate([*common, "--output_dir", str(tmp_path / "two")], nprocs=2)
    assert "4 batches per rank on 2 rank(s), ZeRO-3" in proc.stdout
    one, two = (sorted(read_jsonl(tmp_path / d / "predictions.jsonl"), key=lambda r: r["id"]) for d in ("one", "two"))
    assert len(one) == 58 and one == two
    assert set(one[0]) == {"id", "task", "category", "prediction", "references"}
    assert len({r["prediction"] for r in one}) >= 4  # a non-degenerate model: the comparison means something
    r1, r2 = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    for key in ("rougeL", "exact_match", "num_examples", "per_category"):
        assert r1[key] == r2[key], key
    assert r1["flops"] == pytest.approx(r2["flops"], rel=1e-9)  # the repeated batch is not counted twice
    assert (r1["cost"]["world_size"], r2["cost"]["world_size"]) == (1, 2)
    task = r1["per_task"]["task101_words_reverse_then_uppercase"]
    assert task["num_examples"] == 2 and task["flops"] > 0 and task["wall_s"] > 0
    assert sum(t["flops"] for t in r1["per_task"].values()) == pytest.approx(r1["flops"])
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["stage"] == "evaluate" and config["deepspeed"]["zero_optimization"]["stage"] == 3


def test_dev_split_evaluates_the_builtin_development_tasks(tmp_path, hypernet):
    from tagi_ds.data.builtin import builtin_suite

    evaluate(
        [
            "--hypernet",
            str(hypernet),
            "--split",
            "dev",
            "--batch_size",
            "16",
            *SMALL,
            "--output_dir",
            str(tmp_path / "dev"),
        ]
    )
    results = json.loads((tmp_path / "dev" / "results.json").read_text())
    assert results["split"] == "dev" and results["num_examples"] == 2 * len(builtin_suite(0)["dev"])
    assert sorted(results["per_task"]) == sorted(t.name for t in builtin_suite(0)["dev"])


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_rank_classification_picks_the_answer_each_teacher_makes_likely(tmp_path):
    """Two held-out P3 datasets with the *same* inputs and opposite answers: only a per-task teacher can get
    both right. Each bank row is fitted to its dataset's answer, then evaluate.py (mode teacher) must choose
    it for every example: 100% on both, which no input-only or first-option-on-ties scorer reaches."""
    from tagi_ds import data

    root = tmp_path / "p3"
    inputs = [f"Premise {i}: the {w} is on the table. Does it follow?" for i, w in enumerate("cup pen box hat".split())]
    write_jsonl(
        root / "super_glue_rte" / "GPT_3_style" / "validation.jsonl",
        [{"inputs": x, "targets": "yes", "answer_choices": ["yes", "no"]} for x in inputs],
    )
    write_jsonl(
        root / "super_glue_cb" / "can_we_infer" / "validation.jsonl",
        [{"inputs": x, "targets": "no", "answer_choices": ["yes", "no", "maybe"]} for x in inputs],
    )
    cfg = tiny_cfg("tiny")
    cfg.data.spec, cfg.mode = f"p3:{root}", "concat"
    tok = data.load_tokenizer(cfg)
    tasks = data.load_tasks(cfg.data.spec, cfg.data, "test")
    rows = data.teacher_rows(tasks, "task")
    torch.manual_seed(cfg.train.seed)  # as evaluate.py builds the (non-ZeRO-3) backbone
    model = build_model(cfg, "teachers", build_backbone(cfg), num_bank_rows=len(rows))
    loader = data.build_train_loader(cfg, tok, "teachers", teacher_rows=rows, tasks=tasks)
    opt = torch.optim.Adam(model.bank.parameters(), lr=3e-2)
    for _ in range(16):
        loss, _ = model(next(loader))
        opt.zero_grad()
        loss.backward()
        opt.step()
    artifacts.save_teachers(model, tmp_path / "teachers", rows, "task")

    out = tmp_path / "eval"
    evaluate(
        [
            "--teachers",
            str(tmp_path / "teachers"),
            "--data",
            f"p3:{root}",
            "--output_dir",
            str(out),
            "--deepspeed",
            str(REPO / "ds_configs" / "z2.json"),
            "--batch_size",
            "4",
        ]
    )
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == "rank" and results["mode"] == "teacher"
    assert results["per_dataset"] == {"super_glue_cb": 100.0, "super_glue_rte": 100.0}
    assert results["accuracy"] == 100.0 and results["mtest11"] is None and not results["complete"]
    assert results["per_task"]["super_glue_cb__can_we_infer"]["num_examples"] == 4
    preds = read_jsonl(out / "predictions.jsonl")
    assert [p["prediction"] for p in preds] == ["no"] * 4 + ["yes"] * 4  # data order: cb, then rte
    assert all(p["correct"] and len(p["scores"]) == len(p["choices"]) for p in preds)
    assert all(max(p["scores"]) - sorted(p["scores"])[-2] > 0.5 for p in preds)  # clear winners, not ties


@pytest.fixture()
def teachers_dir(tmp_path):
    """A teachers/ dir with rows for two training tasks only."""
    cfg = tiny_cfg("tiny")
    model = build_model(cfg, "teachers", build_backbone(cfg), num_bank_rows=2)
    path = tmp_path / "teachers"
    artifacts.save_teachers(model, path, {"train_task_a": 0, "train_task_b": 1}, "task")
    return path


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--hypernet", "/nonexistent/hn"], "--hypernet '/nonexistent/hn': no such directory"),
        (["--mode", "tagi"], "--mode tagi needs --hypernet DIR"),
        ([], "nothing to evaluate: give --hypernet DIR"),
        (["--hypernet", "{hn}", "--mode", "concat"], "--hypernet is evaluated in mode tagi, got --mode concat"),
        (["--hypernet", "{hn}", "--adapter", "{hn}"], "--hypernet and --adapter exclude each other"),
        (["--hypernet", "{hn}", "--recipe", "tiny-llama"], "--recipe tiny-llama disagrees with"),
        (["--hypernet", "{hn}", "--max_new_tokens", "0"], "--max_new_tokens: must be > 0 (0)"),
        (["--hypernet", "{hn}", "--task", "rank"], "has no answer_choices"),
        (["--hypernet", "{hn}", "--set", "data.bogus=1"], "data.bogus: unknown config key"),
        (["--teachers", "{teachers}", "--mode", "concat"], "--teachers selects mode teacher"),
        (["--teachers", "{teachers}"], "no teacher for task 'task101_words_reverse_then_uppercase'"),
        (["--adapter", "{teachers}"], "rows.json has 2 rows; a baseline_lora/ dir has one shared row"),
        (["--adapter", "{hn}"], "no teachers.safetensors"),
    ],
)
def test_bad_input_is_one_line_naming_the_flag(hypernet, teachers_dir, argv, message):
    argv = [a.replace("{hn}", str(hypernet)).replace("{teachers}", str(teachers_dir)) for a in argv]
    err = run_main("evaluate.py", [*argv, "--output_dir", "/nonexistent/never_written"])
    assert message in err, err
    assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize("script", ["evaluate.py", "generate_adapter.py"])
def test_help_documents_every_flag(script):
    parser = load_launcher(script).parser()
    text = parser.format_help()
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, f"{script}: {action.option_strings} has no help"
    # choices are spelled out in the launchers (cheap --help); they must match the implementation's
    choices = {a.dest: a.choices for a in parser._actions}
    if script == "evaluate.py":
        from tagi_ds.eval.cost import METHODS

        assert tuple(choices["flops"]) == METHODS
    else:
        from tagi_ds.export.peft import CONDITIONS

        assert tuple(choices["condition"]) == CONDITIONS
