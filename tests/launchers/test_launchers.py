"""Launcher contracts: documented flags, one-line errors (exit 2), resolved config.json, stop_after."""

import json
import subprocess
import sys

import pytest

from tagi_ds.cli import training_parser
from tests.train.harness import HANG_S, REPO, env

LAUNCHERS = ["train_teachers.py", "pretrain.py", "finetune.py"]
SHARED = ["--recipe", "--deepspeed", "--local_rank", "--model_name_or_path", "--data", "--output_dir", "--max_steps",
          "--save_steps", "--resume_from_checkpoint", "--seed", "--set", "--mode"]


def run(script, *args, timeout=HANG_S):
    return subprocess.run([sys.executable, str(REPO / "launchers" / script), *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout)


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


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_resume_latest_on_empty_dir_says_so(tmp_path):
    proc = run("pretrain.py", "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest")
    _one_line_error(proc, "--resume_from_checkpoint latest", "no complete checkpoint", str(tmp_path))
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("args, needles", [
    (["--set", "hypernet.rnak=3"], ["hypernet.rnak: unknown config key"]),
    (["--set", "train.lr=fast"], ["train.lr: expects a finite float ('fast')"]),
    (["--max_steps", "0"], ["--max_steps: must be > 0 (0)"]),
    (["--deepspeed", "nope.json"], ["--deepspeed 'nope.json': no such file"]),
    (["--data", "ftp:/x"], ["ftp"]),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, args, needles):
    out = tmp_path / "run"
    proc = run("pretrain.py", "--output_dir", str(out), *args)
    _one_line_error(proc, *needles)
    assert not (out / "checkpoints").exists() and not (out / "hypernet").exists()


def test_unknown_flag_is_rejected():
    proc = run("finetune.py", "--max_stpes", "3")
    assert proc.returncode == 2 and "unrecognized arguments: --max_stpes" in proc.stderr


def test_deepspeed_json_with_auto_or_owned_keys_is_rejected(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}))
    _one_line_error(run("pretrain.py", "--deepspeed", str(bad), "--output_dir", str(tmp_path / "o")),
                    "zero_optimization.reduce_bucket_size is \"auto\"")
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": 8}))
    _one_line_error(run("pretrain.py", "--deepspeed", str(bad), "--output_dir", str(tmp_path / "o")),
                    "'train_batch_size' comes from the tagi-ds config")


def test_single_process_run_writes_the_output_contract(tmp_path):
    out = tmp_path / "run"
    proc = run("pretrain.py", "--output_dir", str(out), "--max_steps", "4", "--save_steps", "2",
               "--set", "train.keep_last=1", "data.tasks_per_batch=2", "data.examples_per_task=2")
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
        assert ("built-in text corpus" if script == "pretrain.py" else
                f"built-in task suite's {len(builtin_suite(0)['train'])} training tasks") in flat
        out = {"train_teachers.py": "runs/teachers"}.get(script, f"runs/{script.removesuffix('.py')}")
        assert f"(default: {out})" in flat
