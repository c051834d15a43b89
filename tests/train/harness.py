"""Run launchers as real processes: the deepspeed launcher with N CPU ranks over gloo."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tagi_ds.launch import free_port  # noqa: F401  (re-exported for the tests that pass ports themselves)

REPO = Path(__file__).resolve().parents[2]
Z3 = json.loads((REPO / "ds_configs" / "z3.json").read_text())
TINY = ["--set", "data.tasks_per_batch=2", "data.examples_per_task=2", "train.log_steps=1"]


def hang_limit(idle_s: float) -> int:
    """The wall-clock limit for a job that takes ``idle_s`` seconds on 2 idle cores. Every limit in the tests is a
    hang guard, never a speed check: the README's test command must pass while other CPU-heavy jobs run beside
    it (at load 4-6 on 2 cores the slowest jobs took 2-3 times as long as idle), so 10 times the idle time, and
    never under 10 minutes. pytest-timeout (pyproject.toml: 30 minutes) bounds a whole test."""
    return max(600, round(10 * idle_s))


HANG_S = hang_limit(60)  # one launch or one process: none of the suite's takes a minute on 2 idle cores


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


def run_job(cmd: list[str], timeout: int = HANG_S, env_: dict | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` from the repository root, in a session of its own.

    Past ``timeout`` the whole session is killed, the ranks with the launcher (``subprocess.run``'s own timeout
    kills the launcher alone: its ranks would go on using the CPU and holding the pipes), and the test fails
    with the output so far."""
    with subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env() if env_ is None else env_,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_session(proc)
            out, err = proc.communicate()
            pytest.fail(
                f"hang guard: still running after {timeout} s, killed: {' '.join(cmd)}\n{out[-4000:]}\n{err[-4000:]}"
            )
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def launch(
    script: str, nprocs: int, args: list[str], timeout: int = HANG_S, extra_env: dict | None = None
) -> subprocess.CompletedProcess:
    return run_job(command(script, nprocs, args), timeout, {**env(), **(extra_env or {})})


def popen(script: str, nprocs: int, args: list[str]) -> subprocess.Popen:
    """A job in a session of its own (``kill_session`` ends the launcher and every rank), stdout and stderr in one
    pipe. Use it as a context manager: a failed test then never leaves the job running."""
    return Job(
        command(script, nprocs, args),
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


class Job(subprocess.Popen):
    def __exit__(self, *exc):
        if self.poll() is None:
            kill_session(self)
        return super().__exit__(*exc)


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL to the process group ``proc`` leads (the launcher and its ranks: they stay in its group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # every process of the group has exited (and been reaped)
        pass


def wait_until(done: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: int = HANG_S) -> None:
    """Poll until ``done()``, the event the test waits for. Fails at once if the job exits first (the event can
    no longer come) and after ``timeout`` seconds, a hang guard only."""
    deadline = time.monotonic() + timeout
    while True:
        exited = proc.poll() is not None  # before done(): the job may reach the event and then exit
        if done():
            return
        if exited or time.monotonic() > deadline:
            kill_session(proc)  # its ranks too, so that the pipe reaches EOF
            out = proc.stdout.read() if proc.stdout else ""
            why = f"the job exited ({proc.returncode})" if exited else f"hang guard: {timeout} s passed"
            pytest.fail(f"{why} before {what}\n{out[-4000:]}")
        time.sleep(0.2)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc
