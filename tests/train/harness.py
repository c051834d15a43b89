"""Run launchers as real processes: the deepspeed launcher with N CPU ranks over gloo."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
Z3 = json.loads((REPO / "ds_configs" / "z3.json").read_text())
TINY = ["--set", "data.tasks_per_batch=2", "data.examples_per_task=2", "train.log_steps=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    e.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    return e


def launch(script: str, nprocs: int, args: list[str], timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs),
           "--master_port", str(free_port()), str(REPO / "launchers" / script), *args]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout, **kw)


def popen(script: str, nprocs: int, args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs),
           "--master_port", str(free_port()), str(REPO / "launchers" / script), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc
