"""Run launchers as real processes: the deepspeed launcher with N CPU ranks over gloo."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tagi_ds.launch import free_port  # noqa: F401  (re-exported for the tests that pass ports themselves)

REPO = Path(__file__).resolve().parents[2]
Z3 = json.loads((REPO / "ds_configs" / "z3.json").read_text())
TINY = ["--set", "data.tasks_per_batch=2", "data.examples_per_task=2", "train.log_steps=1"]


def partitioned_z3(tmp: Path) -> str:
    """z3.json with persistence threshold 0: the tiny backbone really is partitioned in every forward."""
    cfg = json.loads(json.dumps(Z3))
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp / "z3_partitioned.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def env() -> dict:
    e = dict(os.environ)
    e.pop("TRITON_INTERPRET", None)
    e.pop("MASTER_PORT", None)  # tagi_ds.launch picks a free port per launch
    e.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    return e


def command(script: str, nprocs: int, args: list[str]) -> list[str]:
    """The deepspeed launcher through tagi_ds.launch, which picks a free port (as the quickstart does)."""
    return [sys.executable, "-m", "tagi_ds.launch", "--num_gpus", str(nprocs), str(REPO / "launchers" / script), *args]


def launch(script: str, nprocs: int, args: list[str], timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(command(script, nprocs, args), cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout, **kw)


def popen(script: str, nprocs: int, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command(script, nprocs, args), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc
