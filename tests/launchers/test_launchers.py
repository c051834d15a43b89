"""Launcher contracts: documented flags, one-line errors (exit 2), resolved config.json, stop_after."""

import json
import subprocess
import sys

import pytest

from tagi_ds.cli import training_parser
from tests.train.harness import HANG_S, REPO, env

LAUNCHERS = ["train_teachers.py", "pretrain.py", "finetune.py"]
SHARED = [
    "--recipe",
    "--deepspeed",
    "--local_rank",
    "--model_name_or_path",
    "--data",
    "--output_dir",
    "--max_steps",
    "--save_steps",
    "--resume_from_checkpoint",
    "--seed",
    "--set",
    "--mode",
]


def run(script, *args, timeout=HANG_S):
    return subprocess.run(
        [sys.executable, str(REPO / "launchers" / script), *args],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("script", LAUNCHERS)
def test_help_documents_every_flag(script):
    out = run(script, "--help").stdout
    stage = {"train_teachers.py": "teachers"}.get(script, script.removesuffix(".py"))
    parser = training_parser(stage, "")
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {f.option_strings[0] for f in flags} >= set(SHARED)
    for action in flags:
        assert action.help and action.help.strip(), f"{action.option_strings[0]} has no help text"
        assert action.option_strings[0] in out
    if script == "finetune.py":
        assert "--teachers" in out and "--init_hypernet" in out


# The launchers' bad input (unknown flags and keys, bad values, a missing or "auto"-keyed DeepSpeed JSON, resume of
# an empty dir, a bad data scheme) is tests/runtime/test_bad_input.py's table, in one process; these were the same
# cases once more in a process each (issue 29: 9 processes, ~1 min of the suite, nothing checked that the table
# does not: exit 2, one line naming the value, nothing written; its test_processes_report_one_line keeps real
# processes for what only a process shows).


def test_single_process_run_writes_the_output_contract(tmp_path):
    out = tmp_path / "run"
    proc = run(
        "pretrain.py",
        "--output_dir",
        str(out),
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--set",
        "train.keep_last=1",
        "data.tasks_per_batch=2",
        "data.examples_per_task=2",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["deepspeed"]["train_micro_batch_size_per_gpu"] == 4
    assert cfg["deepspeed"]["zero_optimization"]["stage"] == 3 and cfg["precision"] == "fp32"
    assert cfg["tagi"]["train"]["keep_last"] == 1
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "lr", "tokens_per_s", "ce", "grad_norm"} <= set(rows[0])
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-4"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-4"]  # keep_last=1 pruned step-2
    # The frozen backbone is not in the checkpoint: it is far smaller than the backbone itself.
    size = sum(f.stat().st_size for f in (ckpts / "step-4").iterdir())
    assert (out / "hypernet" / "generator.safetensors").exists() and (out / "hypernet" / "config.json").exists()
    assert "precision fp32" in proc.stdout and "[step 4/4]" in proc.stdout
    assert size < 12 * 293_632 * 4  # ~ params + Adam state of the hypernet only (backbone: 263k params extra)


@pytest.mark.parametrize("script", [*LAUNCHERS, "evaluate.py", "generate_adapter.py"])
def test_help_states_each_default_once_lists_mini_and_names_the_default_run(script):
    from tests.eval.test_evaluate import load_launcher

    if script in LAUNCHERS:
        stage = {"train_teachers.py": "teachers"}.get(script, script.removesuffix(".py"))
        parser = training_parser(stage, "")
    else:
        parser = load_launcher(script).parser()
    text = parser.format_help()
    assert "(default: None)" not in text and "default: default" not in text
    for action in parser._actions:
        rendered = parser._get_formatter()._expand_help(action) if action.help else ""
        assert rendered.count("default") <= 1, (action.option_strings, rendered)
    flat = " ".join(text.split())
    assert "mini (" in flat and "tiny (" in flat
    # what the default really is (tests/runtime/test_ds_configs.py resolves it): z3_tiny.json for the tiny recipes
    assert "(default: ds_configs/z3_tiny.json for the tiny* recipes, else ds_configs/z3.json)" in flat
    if script in LAUNCHERS:
        from tagi_ds.data import builtin_suite
        from tagi_ds.recipes import get_recipe

        assert f"trains {get_recipe('tiny').train.max_steps} steps" in flat
        assert (
            "built-in text corpus"
            if script == "pretrain.py"
            else f"built-in task suite's {len(builtin_suite(0)['train'])} training tasks"
        ) in flat
        out = {"train_teachers.py": "runs/teachers"}.get(script, f"runs/{script.removesuffix('.py')}")
        assert f"(default: {out})" in flat
