"""Orderly stopping paths: train.max_bad_steps (own line, own exit code, a checkpoint, the step logged), strict
JSON metrics, a signal sent to the deepspeed runner alone (it reaches the ranks), a damaged metrics line."""

import json
import os
import signal
import time

import pytest

from tagi_ds.runtime.preflight import EXIT_BAD_STEPS
from tagi_ds.train.progress import Progress
from tests.train.harness import HANG_S, TINY, launch, popen, wait_until

FT = ["--set", "loss.kl_weight=0", "loss.param_weight=0"]  # finetune without teachers: CE only


def strict_lines(path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON: NaN / Infinity are refused."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.distributed
def test_max_bad_steps_stops_with_its_own_line_code_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = launch(
        "finetune.py",
        2,
        [
            "--output_dir",
            str(out),
            "--max_steps",
            "20",
            "--save_steps",
            "100",
            *TINY,
            *FT,
            "train.inject_fault=nan@1-99:1",
            "train.max_bad_steps=2",
        ],
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_BAD_STEPS == 3, log[-4000:]
    assert "Traceback" not in log
    stopped = [ln for ln in proc.stderr.splitlines() if ln.startswith("stopped:")]
    assert len(stopped) == 1, log[-4000:]  # rank 0 only
    assert "train.max_bad_steps=2: 2 non-finite steps in a row (steps 2-3)" in stopped[0]
    rows = strict_lines(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]  # the stopping step is logged
    assert rows[0]["loss"] > 0 and rows[0]["grad_norm"] > 0
    for r in rows[1:]:  # skipped: no loss, and not the previous step's gradient norm
        assert r["loss"] is None and r["grad_norm"] is None
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2]
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-3"
    finger = json.loads((ckpts / "step-3" / "tagi_checkpoint.json").read_text())
    assert finger["stage"] == "finetune" and finger["world_size"] == 2 and finger["step"] == 3


@pytest.mark.distributed
def test_a_signal_to_the_runner_alone_reaches_the_ranks(tmp_path):
    """SIGTERM to the ``deepspeed`` runner's PID only (it has no handler and dies): the ranks notice, finish
    the step, save and exit 0, well before max_steps, and nothing of the job is left running."""
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    with popen(
        "finetune.py", 2, ["--output_dir", str(out), "--max_steps", "400", "--save_steps", "1000", *TINY, *FT]
    ) as proc:
        wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc, "two logged steps")
        os.kill(proc.pid, signal.SIGTERM)
        log, _ = proc.communicate(timeout=HANG_S)  # EOF: every rank (they share the pipe) has exited
    assert proc.returncode == -signal.SIGTERM
    # No rank, no launcher left (zombies aside: nobody reaps orphans here). A process that closed the pipe can take
    # a moment more to finish exiting on a loaded machine: wait for that, with a hang guard only.
    deadline = time.monotonic() + HANG_S
    while _alive_in_group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive_in_group(proc.pid)
    step = int((out / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert 2 <= step < 400
    assert f"the deepspeed runner (pid {proc.pid}) exited: saved step {step}" in log, log[-4000:]
    assert [r["step"] for r in strict_lines(metrics)][-1] == step


def _alive_in_group(pgid: int) -> list[int]:
    import psutil

    alive = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except (OSError, psutil.Error):
            pass
    return alive


def test_a_truncated_last_metrics_line_does_not_break_a_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": NaN, "grad_norm": 1.5}\n'
        '{"step": 3, "loss": 1.9}\n{"step": 4, "lo'
    )  # a kill mid-write; NaN from older versions
    progress = Progress(tmp_path, "pretrain", 10, start=3)
    progress.log(
        {
            "step": 4,
            "loss": float("nan"),
            "lr": 1e-3,
            "tokens_per_s": 10.0,
            "grad_norm": float("inf"),
            "skipped_steps": 1,
        }
    )
    progress.close()
    rows = strict_lines(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["loss"] is None and rows[1]["grad_norm"] == 1.5
    assert rows[3]["loss"] is None and rows[3]["grad_norm"] is None


def test_rank_zero_names_a_stop_another_rank_saw_first(monkeypatch):
    """Each rank polls the launcher on its own clock. When rank 1 saw the runner gone first (a loaded machine),
    rank 0, which prints why the run stopped, looks at once: its line names the runner, not ``None``."""
    import subprocess
    import sys

    import psutil

    from tagi_ds.runtime import dist
    from tagi_ds.train.guards import Guards

    runner = subprocess.Popen([sys.executable, "-c", "pass"])
    watched = psutil.Process(runner.pid)
    runner.wait()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        seen, unseen = Guards(2, watch_launcher=False), Guards(2, watch_launcher=False)  # no watch thread
    finally:  # Guards installs the ranks' stop handlers: not in the test process
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    seen._watched = [(watched, "deepspeed runner")]
    monkeypatch.setattr(dist, "any_rank", lambda flag, device=None: True)  # another rank asked to stop
    assert seen.stop_requested() and seen.reason == f"the deepspeed runner (pid {runner.pid}) exited"
    assert unseen.stop_requested() and unseen.reason == "a stop requested on another rank"
