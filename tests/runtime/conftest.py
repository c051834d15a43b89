"""Artifacts made once per test session by a short real run (one process, 2 steps per stage), which the
bad-input cases copy and damage: teachers/, hypernet/, baseline_lora/, a checkpoint of each stage, and a
local HF backbone dir (the tiny T5 with the built-in tokenizer, as scripts/pretrain_backbone.py writes one)."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.harness import HANG_S, REPO, env

SMALL = ["--max_steps", "2", "--save_steps", "2", "--set", "data.tasks_per_batch=2", "data.examples_per_task=2"]
# The three stages in one process: one import of torch/deepspeed/transformers instead of three.
SCRIPT = f"""
import sys
from tagi_ds.cli import train_main
out, small = sys.argv[1], {SMALL!r}
train_main("teachers", "teachers", ["--output_dir", out + "/teachers", *small])
train_main("pretrain", "pretrain", ["--output_dir", out + "/pretrain", *small])
train_main("finetune", "finetune", ["--output_dir", out + "/concat", "--mode", "concat", *small])
sys.path.insert(0, "scripts")
from pretrain_backbone import build_tokenizer
from tagi_ds.model import build_backbone
from tagi_ds.recipes import get_recipe
build_backbone(get_recipe("tiny")).save_pretrained(out + "/backbone")
build_tokenizer()[0].save_pretrained(out + "/backbone")
"""


@pytest.fixture(scope="session")
def runs(once) -> Path:
    """Made ``once`` per session, also across pytest-xdist workers (the bad-input cases land on both)."""

    def make(out: Path) -> None:
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(out)],
            cwd=REPO,
            env=env(),
            capture_output=True,
            text=True,
            timeout=HANG_S,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        for f in (
            "teachers/teachers/teachers.safetensors",
            "pretrain/hypernet/generator.safetensors",
            "concat/baseline_lora/teachers.safetensors",
            "pretrain/checkpoints/step-2/trainer_rank0.pt",
            "backbone/model.safetensors",
        ):
            assert (out / f).is_file(), f

    return once("runtime-runs", make)[0]
