"""Faults during a run (issue 30): each ends in one line, keeps the last complete checkpoint, and resumes from it
bit-exactly. One process runs every single-rank scenario in turn (one import of torch/deepspeed instead of ten);
the 2-rank cases go through the launcher.

Scenarios of the one process (``SCRIPT``), each a ``train_main`` call whose stderr and exit code are recorded as
the launcher entry point (:func:`tagi_ds.runtime.preflight.guarded`) would turn them into a line and a code."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tagi_ds.runtime import rundir
from tests.train.harness import HANG_S, REPO, TINY, check, command, env, launch, metrics, popen, run_job

SMALL = ["--save_steps", "2", *TINY, "train.keep_last=2"]

SCRIPT = r"""
import contextlib, io, json, sys
from tagi_ds.cli import train_main
from tagi_ds.config import ConfigError
from tagi_ds.data.task import DataError
from tagi_ds.runtime.preflight import Stopped

def run(name, argv):
    err = io.StringIO()
    rc = 0
    with contextlib.redirect_stderr(err):
        try:
            train_main("pretrain", "pretrain", argv)
        except (ConfigError, DataError) as e:
            print("error: " + str(e), file=sys.stderr)
            rc = 2
        except Stopped as e:
            rc = e.exit_code
    print("@@" + json.dumps({"name": name, "rc": rc, "stderr": err.getvalue()}), flush=True)

for name, argv in json.loads(sys.argv[1]):
    if name.startswith("!"):  # a file-system step between runs: ["!damage", [kind, path, arg]]
        kind, path, arg = argv
        import os, pathlib, shutil
        p = pathlib.Path(path)
        if kind == "copy":
            shutil.copytree(p, arg)
        elif kind == "write":
            p.write_bytes(bytes.fromhex(arg))
        elif kind == "rm":
            p.unlink()
        elif kind == "rmtree":
            shutil.rmtree(p)
        continue
    run(name, argv)
"""


def _run_all(steps: list) -> dict[str, dict]:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(steps)],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {r["name"]: r for r in (json.loads(ln[2:]) for ln in proc.stdout.splitlines() if ln.startswith("@@"))}


def _one_line(result: dict, *expected: str) -> str:
    lines = [ln for ln in result["stderr"].splitlines() if ln.startswith(("error:", "note:"))]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
    assert len(errors) <= 1, lines
    line = (errors or lines)[0]
    for e in expected:
        assert e in line, (e, line)
    return line


def _records(out) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out)}


@pytest.fixture(scope="module")
def single(once):
    """Every single-rank scenario, in one process. ``ref``: 6 steps uninterrupted (the bit-exact reference). Run
    ``once`` per session, also across pytest-xdist workers."""

    def make(t):
        ref, old, full, start, bad = t / "ref", t / "old", t / "full", t / "start", t / "bad"
        miss, miss2, nowhere = t / "miss", t / "miss2", t / "nowhere"
        steps = [
            ("ref", ["--output_dir", str(ref), "--max_steps", "6", *SMALL]),
            # a fresh run into a dir that holds another run's checkpoints (higher steps): refused, then --start_over
            ("!copy", ["copy", str(ref), str(old)]),
            ("fresh-over-old", ["--output_dir", str(old), "--max_steps", "2", *SMALL]),
            ("start-over", ["--output_dir", str(old), "--max_steps", "2", "--start_over", *SMALL]),
            # the disk fills during the 2nd save; then the resume continues from the 1st
            ("enospc", ["--output_dir", str(full), "--max_steps", "6", *SMALL, "train.inject_fault=enospc@4"]),
            ("!copy", ["copy", str(full), str(t / "full-at-fault")]),  # what the fault left, before the resume
            (
                "enospc-resume",
                ["--output_dir", str(full), "--max_steps", "6", "--resume_from_checkpoint", "latest", *SMALL],
            ),
            # the directory turns read-only during the 2nd save (as root, chmod does not stop writes: injected EROFS)
            ("rofs", ["--output_dir", str(t / "rofs"), "--max_steps", "4", *SMALL, "train.inject_fault=rofs@4"]),
            # the disk is full at start: config.json cannot be written
            ("enospc-start", ["--output_dir", str(start), "--max_steps", "2", *SMALL, "train.inject_fault=enospc@0"]),
            # latest is not UTF-8: the newest complete step is used, and said so
            ("!copy", ["copy", str(ref), str(bad)]),
            ("!write", ["write", str(bad / "checkpoints" / "latest"), "ff fe 73 74 65 70 0a"]),
            ("!rmtree", ["rmtree", str(bad / "checkpoints" / "step-6"), ""]),  # so that the resume has steps to run
            (
                "bad-latest",
                ["--output_dir", str(bad), "--max_steps", "6", "--resume_from_checkpoint", "latest", *SMALL],
            ),
            # latest points at a step that is gone
            ("!copy", ["copy", str(ref), str(nowhere)]),
            ("!write", ["write", str(nowhere / "checkpoints" / "latest"), b"step-99\n".hex()]),
            ("!rmtree", ["rmtree", str(nowhere / "checkpoints" / "step-6"), ""]),
            (
                "nowhere-latest",
                ["--output_dir", str(nowhere), "--max_steps", "6", "--resume_from_checkpoint", "latest", *SMALL],
            ),
            # the newest step lacks a DeepSpeed optimizer file: by path refused before anything is written; with latest
            # the older complete step is used
            ("!copy", ["copy", str(ref), str(miss)]),
            ("!rm", ["rm", str(miss / "checkpoints" / "step-6" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"), ""]),
            ("!copy", ["copy", str(miss), str(miss2)]),
            (
                "miss-by-path",
                [
                    "--output_dir",
                    str(miss),
                    "--max_steps",
                    "8",
                    "--resume_from_checkpoint",
                    str(miss / "checkpoints" / "step-6"),
                    *SMALL,
                ],
            ),
            (
                "miss-latest",
                ["--output_dir", str(miss2), "--max_steps", "6", "--resume_from_checkpoint", "latest", *SMALL],
            ),
        ]
        return _run_all(steps)

    t, results = once("faults-single", make)
    return t, results, None


def test_fresh_run_into_another_runs_dir_is_refused_then_start_over_keeps_its_own(single):
    t, r, _ = single
    old = t / "old"
    assert r["fresh-over-old"]["rc"] == 2
    _one_line(
        r["fresh-over-old"],
        f"--output_dir {old}: holds another run's checkpoints (newest complete step-6)",
        "--resume_from_checkpoint latest",
        "--start_over",
    )
    assert r["start-over"]["rc"] == 0, r["start-over"]["stderr"][-2000:]
    ckpts = old / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-2\n"  # the new run's checkpoint survived its own pruning
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-2"]
    (aside,) = old.glob("replaced-*")
    assert sorted(p.name for p in (aside / "checkpoints").glob("step-*")) == ["step-4", "step-6"]
    assert [m["step"] for m in metrics(old)] == [1, 2]  # the old run's metrics went aside with its checkpoints
    assert _losses(old) == {k: v for k, v in _losses(t / "ref").items() if k <= 2}


def test_pruning_removes_only_checkpoints_of_the_run_that_writes(tmp_path):
    from tagi_ds.train import checkpoint

    ckpts = tmp_path / "checkpoints"
    for step, run in ((2, "a"), (4, "a"), (6, "b"), (8, "b"), (10, None), (12, "a")):
        d = ckpts / f"step-{step}"
        d.mkdir(parents=True)
        if run:
            (d / checkpoint.FINGERPRINT).write_text(json.dumps({"run_id": run}))
    checkpoint._prune(ckpts, 1, 4, "a")  # run a just wrote step 4; its step 12 is a future it abandoned
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-10", "step-12", "step-4", "step-6", "step-8"]


def test_disk_full_during_a_save_keeps_the_previous_checkpoint_and_resumes_bit_exactly(single):
    t, r, _ = single
    full = t / "full"
    res = r["enospc"]
    assert res["rc"] == 4, res["stderr"][-3000:]
    line = _one_line(
        res,
        "error: saving step 4 failed: cannot write",
        os.strerror(errno.ENOSPC),
        f"last complete checkpoint {full / 'checkpoints' / 'step-2'}",
        "--resume_from_checkpoint latest",
    )
    assert "step-4.tmp" in line
    ckpts = t / "full-at-fault" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-2\n"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-")) == ["step-2"]  # no step-4.tmp
    assert r["enospc-resume"]["rc"] == 0, r["enospc-resume"]["stderr"][-3000:]
    ref = _losses(t / "ref")
    got = _losses(full)
    assert [m["step"] for m in metrics(full)] == [1, 2, 3, 4, 5, 6]  # the resume replaced steps 3-4 of the fault
    assert got == ref  # the resumed steps 3-6 are the uninterrupted run's, bit for bit


def test_a_read_only_directory_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(single):
    t, r, _ = single
    res = r["rofs"]
    assert res["rc"] == 4, res["stderr"][-3000:]
    _one_line(
        res,
        "error: saving step 4 failed: cannot write",
        os.strerror(errno.EROFS),
        f"last complete checkpoint {t / 'rofs' / 'checkpoints' / 'step-2'}",
        "--resume_from_checkpoint latest",
    )
    ckpts = t / "rofs" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-2\n"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-")) == ["step-2"]  # no step-4.tmp


def test_disk_full_at_start_is_one_line_and_leaves_no_temp_file(single):
    t, r, _ = single
    start = t / "start"
    res = r["enospc-start"]
    assert res["rc"] == 4
    _one_line(res, f"error: cannot write {start / 'config.json'}: {os.strerror(errno.ENOSPC)}")
    assert sorted(p.name for p in start.iterdir()) == [rundir.LOCK]  # no config.json, no .config.json.tmp.*


@pytest.mark.parametrize(
    "name, problem",
    [
        ("bad-latest", "is not UTF-8 text"),
        ("nowhere-latest", "names step-99: no such checkpoint directory"),
        ("miss-latest", "names step-6: zero_pp_rank_0_mp_rank_00_optim_states.pt is missing"),
    ],
)
def test_resume_latest_uses_the_newest_complete_checkpoint_and_says_so(single, name, problem):
    t, r, _ = single
    out = t / {"bad-latest": "bad", "nowhere-latest": "nowhere", "miss-latest": "miss2"}[name]
    res = r[name]
    assert res["rc"] == 0, res["stderr"][-3000:]
    note = [ln for ln in res["stderr"].splitlines() if ln.startswith("note:")]
    assert len(note) == 1 and problem in note[0] and "resuming from step-4, the newest complete" in note[0], note
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6]  # 5-6 rewritten by the resume
    assert _losses(out) == _losses(t / "ref")  # bit for bit


def test_a_checkpoint_missing_a_shard_is_refused_before_anything_is_written(single):
    t, r, _ = single
    miss = t / "miss"
    res = r["miss-by-path"]
    assert res["rc"] == 2
    _one_line(
        res,
        "zero_pp_rank_0_mp_rank_00_optim_states.pt is missing",
        f"the newest complete checkpoint is {miss / 'checkpoints' / 'step-4'}",
    )
    # preflight refused it: config.json is the copied run's (the refused run asked for max_steps 8), nothing logged
    assert json.loads((miss / "config.json").read_text())["tagi"]["train"]["max_steps"] == 6
    assert [m["step"] for m in metrics(miss)] == [1, 2, 3, 4, 5, 6]


def test_a_second_run_into_a_held_dir_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "held"
    out.mkdir()
    rundir.lock(out)  # this process is the first run
    try:
        proc = subprocess.run(
            [sys.executable, "launchers/pretrain.py", "--output_dir", str(out), "--max_steps", "2", *SMALL],
            cwd=REPO,
            env=env(),
            capture_output=True,
            text=True,
            timeout=HANG_S,
        )
    finally:
        rundir.unlock(out)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and f"another run is using it (pid {os.getpid()} on " in lines[0], lines
    assert sorted(p.name for p in out.iterdir()) == [rundir.LOCK]


@pytest.mark.distributed
def test_two_ranks_disk_full_during_a_save_then_ctrl_c_saves(tmp_path):
    """2 ranks: the 2nd save fails on both ranks at once (one line, rc 4, step-2 kept, no .tmp); the resume is then
    stopped with Ctrl-C (SIGINT to the whole process group, as a terminal sends it): it saves, with no traceback."""
    out = tmp_path / "run"
    proc = launch(
        "pretrain.py",
        2,
        ["--output_dir", str(out), "--max_steps", "400", *SMALL, "train.inject_fault=enospc@4"],
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 4, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    errors = [ln for ln in log.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "saving step 4 failed" in errors[0] and "step-2" in errors[0], errors
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-2\n"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step-")) == ["step-2"]

    run = popen(
        "pretrain.py",
        2,
        [
            "--output_dir",
            str(out),
            "--max_steps",
            "400",
            "--resume_from_checkpoint",
            "latest",
            *SMALL,
            "--save_steps",
            "1000",
        ],
    )
    deadline = time.time() + HANG_S  # a hang guard (issue 29): ~20 s idle
    while time.time() < deadline and _records(out) < 6:  # 4 records of the first run, then steps 3 and 4
        time.sleep(0.3)
    assert _records(out) >= 6, "the resumed run never logged a step"
    os.killpg(run.pid, signal.SIGINT)
    log, _ = run.communicate(timeout=HANG_S)
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-4000:]
    saved = [ln for ln in log.splitlines() if ln.startswith("SIGINT received: saved step")]
    assert len(saved) == 1, log[-4000:]
    step = int((ckpts / "latest").read_text().strip().split("-")[1])
    assert step > 2 and (ckpts / f"step-{step}" / "trainer_rank1.pt").is_file()
    assert metrics(out)[-1]["step"] == step
    shutil.rmtree(out)


def test_plan_measure_refuses_a_model_larger_than_host_memory(monkeypatch, capsys):
    """Estimated first: the step is never built (it used to die in a DefaultCPUAllocator traceback)."""
    import psutil

    from tagi_ds.plan import cli

    class Little:
        available = 2**30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Little)
    monkeypatch.setattr(cli, "measure_step", lambda p: pytest.fail("measured anyway"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--stage", "none", "--nodes", "1", "--gpus_per_node", "1", "--model", "t5-xl", "--measure"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--measure: the step needs about" in err[0] and "1.0 GiB are available" in err[0], err


def _launcher_line(log: str) -> str:
    assert "Traceback" not in log and "Connection closed" not in log, log[-4000:]
    errors = [ln for ln in log.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, log[-4000:]
    return errors[0]


@pytest.mark.distributed
def test_a_dead_rank_and_a_frozen_rank_are_named_in_one_line_and_the_run_resumes(tmp_path):
    """2 ranks. Rank 1 SIGKILLs itself at step 5: the launcher ends the job (exit 6) with one line naming rank 1,
    SIGKILL, the last complete checkpoint (step-4) and the resume command; no gloo traceback from rank 0. The
    resume recomputes step 5 bit for bit (the killed run had logged it). Then rank 1 SIGSTOPs itself: found by
    its missing heartbeat after --rank_timeout, reported the same way, and no rank is left behind."""
    out = tmp_path / "run"
    args = ["--output_dir", str(out), "--max_steps", "400", *SMALL]
    t0 = time.monotonic()
    proc = launch("pretrain.py", 2, [*args, "train.inject_fault=kill@5:1"], timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 6, log[-4000:]
    line = _launcher_line(log)
    # the signal, unless the DeepSpeed launcher reaped the rank before the watchdog's 50 ms poll saw it
    assert line.startswith("error: rank 1 (pid ") and ("killed by SIGKILL" in line or "died without" in line), line
    assert f"last complete checkpoint {out / 'checkpoints' / 'step-4'}" in line, line
    assert "resume with: python -m tagi_ds.launch --num_gpus 2 " in line and "--resume_from_checkpoint latest" in line
    killed = _losses(out)
    assert max(killed) == 5, killed  # step 5 was logged; the kill came in step 6
    print(f"kill: {time.monotonic() - t0:.0f}s launch to exit")

    check(
        launch(
            "pretrain.py",
            2,
            ["--output_dir", str(out), "--max_steps", "5", "--resume_from_checkpoint", "latest", *SMALL],
            timeout=600,
        )
    )
    assert _losses(out)[5] == killed[5]  # the resume from step-4 continues bit-exactly

    stopped = tmp_path / "stopped"
    t0 = time.monotonic()
    cmd = command(
        "pretrain.py", 2, ["--output_dir", str(stopped), "--max_steps", "400", *SMALL, "train.inject_fault=stop@3:1"]
    )
    proc = run_job([*cmd[:3], "--rank_timeout", "10", *cmd[3:]], 600, env())  # the launcher's option: before the script
    log = proc.stdout + proc.stderr
    assert proc.returncode == 6, log[-4000:]
    line = _launcher_line(log)
    assert line.startswith("error: rank 1 (pid ") and "stopped responding: no heartbeat for" in line, line
    assert "--rank_timeout 10" in line and "step-2" in line, line
    pid = int(line.split("(pid ")[1].split(")")[0])
    assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split(")")[1][:3]
    print(f"stop: {time.monotonic() - t0:.0f}s launch to exit")
