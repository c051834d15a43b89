"""launchers/slurm/*.sbatch against a fake 2-node Slurm: composed commands, auto-resume, signal relay.

Fake ``scontrol`` (2 hostnames; logs requeue), ``srun`` (runs its command once per fake node with
SLURM_NODEID set, logs one line per node task, forwards USR1/TERM like the real one) and ``deepspeed``
(logs its argv per node; optionally starts a Python "rank" that handles SIGUSR1 the way the training
processes must) sit first on PATH. The scripts run with plain bash from a scratch repository root that
links the real launchers/slurm and ds_configs, so this test does not depend on the launchers' Python.
"""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.train.harness import hang_limit

REPO = Path(__file__).resolve().parents[2]
STAGES = ("train_teachers", "pretrain", "finetune", "evaluate")
RESUMING = {"train_teachers", "pretrain", "finetune"}
HOSTS = ("gpu-node-017", "gpu-node-018")
JOB_ID = 123456
PORT = 20000 + JOB_ID % 20000
# Wall-clock limits here are hang guards only (a few bash processes each; well under a second on 2 idle cores),
# sized for a loaded machine: the suite must pass with other CPU-heavy jobs running beside it.
HANG_S = hang_limit(1)

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or sys.platform == "win32", reason="needs bash")

FAKE_SCONTROL = """\
#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG/scontrol.log"
case "$1" in
  show) [[ $2 == hostnames ]] && printf '%s\\n' {hosts} ;;
  requeue) ;;
  *) exit 1 ;;
esac
"""

FAKE_SRUN = """\
#!/usr/bin/env bash
# Like srun inside an allocation: one task per node, signals forwarded to every task.
pids=()
forward() { ((${#pids[@]})) && kill -"$1" "${pids[@]}" 2>/dev/null; return 0; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
opts=(); while [[ $# -gt 0 && $1 == -* ]]; do opts+=("$1"); shift; done
for ((i = 0; i < SLURM_NNODES; i++)); do
  echo "node=$i opts=${opts[*]} cmd=$*" >> "$FAKE_LOG/srun.log"
  SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do
  while :; do wait "$p"; r=$?; kill -0 "$p" 2>/dev/null || break; done
  wait "$p"; r=$?
  ((r > rc)) && rc=$r
done
exit $rc
"""

# Stands in for the DeepSpeed runner: starts with SIGUSR1 ignored (node.sh's doing), so it must survive
# the group signal, and its "rank" child must still get it.
FAKE_DEEPSPEED = """\
#!/usr/bin/env bash
printf '%s\\n' "$*" > "$FAKE_LOG/deepspeed.$SLURM_NODEID.args"
[[ -z ${FAKE_RANK_WAIT:-} ]] && exit 0
"$FAKE_PYTHON" "$FAKE_LOG/fake_rank.py"
rc=$?
echo "runner survived, rank rc=$rc" > "$FAKE_LOG/runner.$SLURM_NODEID.done"
exit $rc
"""

FAKE_RANK = """\
import os, signal, sys, time
from pathlib import Path

log, node = Path(os.environ["FAKE_LOG"]), os.environ["SLURM_NODEID"]


def save_and_exit(signum, frame):
    (log / f"saved.{node}").write_text(signal.Signals(signum).name)
    sys.exit(0)


signal.signal(signal.SIGUSR1, save_and_exit)
signal.signal(signal.SIGTERM, save_and_exit)
(log / f"ready.{node}").write_text(str(os.getpid()))
time.sleep(900)  # the test signals it as soon as every rank is ready (or kills the job's session when it fails)
sys.exit(3)  # never signalled
"""


def _make_env(tmp_path, fake_deepspeed=True):
    root = tmp_path / "repo"
    (root / "launchers").mkdir(parents=True)
    (root / "launchers" / "slurm").symlink_to(REPO / "launchers" / "slurm")
    (root / "ds_configs").symlink_to(REPO / "ds_configs")
    for stage in STAGES:
        (root / "launchers" / f"{stage}.py").write_text("# placeholder: the fake deepspeed never runs it\n")
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    scripts = {"scontrol": FAKE_SCONTROL.format(hosts=" ".join(HOSTS)), "srun": FAKE_SRUN}
    if fake_deepspeed:
        scripts["deepspeed"] = FAKE_DEEPSPEED
    for name, body in scripts.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    (log / "fake_rank.py").write_text(FAKE_RANK)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "TAGI_"))}
    for key in ("OUT", "RECIPE", "DATA", "DS_CONFIG", "GPUS_PER_NODE", "EXTRA_ARGS", "REQUEUE", "FAKE_RANK_WAIT"):
        env.pop(key, None)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        FAKE_LOG=str(log),
        FAKE_PYTHON=sys.executable,
        # A submitting shell's torch variables must not leak into the rendezvous.
        MASTER_ADDR="bogus-host",
        MASTER_PORT="1",
        SLURM_JOB_ID=str(JOB_ID),
        SLURM_JOB_NODELIST="gpu-node-[017-018]",
        SLURM_NNODES="2",
        SLURM_NODEID="0",
        SLURM_PROCID="0",
        SLURM_SUBMIT_DIR=str(root),
        SLURM_GPUS_ON_NODE="4",
        SLURM_CPUS_PER_TASK="16",
    )
    return {"root": root, "log": log, "env": env, "tmp": tmp_path}


@pytest.fixture
def fake_slurm(tmp_path):
    return _make_env(tmp_path)


def _run(fake, stage, *args, **env):
    script = REPO / "launchers" / "slurm" / f"{stage}.sbatch"
    proc = subprocess.run(
        ["bash", str(script), *args],
        cwd=fake["tmp"],  # not the repository root: the script must find it itself
        env={**fake["env"], **env},
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.parametrize("stage", STAGES)
def test_sbatch_directives(stage):
    text = (REPO / "launchers" / "slurm" / f"{stage}.sbatch").read_text()
    directives = {
        line.split()[1].split("=")[0]: line.split()[1] for line in text.splitlines() if line.startswith("#SBATCH")
    }
    assert text.startswith("#!/bin/bash\n")
    assert directives["--ntasks-per-node"] == "--ntasks-per-node=1"
    assert directives["--signal"] == "--signal=B:USR1@300"
    assert "--requeue" in directives and "--nodes" in directives and "--gpus-per-node" in directives
    assert "# Usage" in text and f"sbatch launchers/slurm/{stage}.sbatch" in text


def _deepspeed_argv(fake, node):
    return shlex.split((fake["log"] / f"deepspeed.{node}.args").read_text())


def _flag(argv, name):
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("has_checkpoint", [False, True])
def test_composed_command(fake_slurm, stage, has_checkpoint):
    out = fake_slurm["tmp"] / "runs" / stage
    if has_checkpoint:
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / "latest").write_text("global_step40")
    _run(fake_slurm, stage, "--max_steps", "7", OUT=str(out), EXTRA_ARGS="--seed 3  --save_steps 5")

    srun_lines = (fake_slurm["log"] / "srun.log").read_text().splitlines()
    assert len(srun_lines) == 2  # one launcher task per node
    for node, line in enumerate(srun_lines):
        assert line.startswith(f"node={node} ")
        assert "--ntasks-per-node=1" in line and "--nodes=2" in line
        assert "launchers/slurm/node.sh deepspeed " in line
    for node in (0, 1):
        argv = _deepspeed_argv(fake_slurm, node)
        launcher_at = argv.index(f"launchers/{stage}.py")
        ds_opts, launcher_args = argv[:launcher_at], argv[launcher_at + 1 :]
        assert _flag(ds_opts, "--node_rank") == str(node)
        assert _flag(ds_opts, "--num_nodes") == "2"
        assert _flag(ds_opts, "--num_gpus") == "4"
        assert _flag(ds_opts, "--master_addr") == HOSTS[0]
        assert _flag(ds_opts, "--master_port") == str(PORT)
        assert "--no_ssh" in ds_opts
        hostfile = Path(_flag(ds_opts, "--hostfile"))
        assert hostfile.read_text().splitlines() == [f"{h} slots=4" for h in HOSTS]
        assert _flag(launcher_args, "--deepspeed") == "ds_configs/z3.json"
        assert _flag(launcher_args, "--output_dir") == str(out)
        assert _flag(launcher_args, "--recipe") == "t5-xl"
        assert _flag(launcher_args, "--data").startswith(("sni:", "text:"))
        # EXTRA_ARGS split on whitespace, then the sbatch arguments verbatim, last.
        assert launcher_args[-6:] == ["--seed", "3", "--save_steps", "5", "--max_steps", "7"]
        resumed = "--resume_from_checkpoint" in launcher_args
        assert resumed == (has_checkpoint and stage in RESUMING)
        if resumed:
            assert _flag(launcher_args, "--resume_from_checkpoint") == "latest"
    # No stop was requested: no requeue.
    assert "requeue" not in (fake_slurm["log"] / "scontrol.log").read_text()


def test_env_overrides_and_defaults(fake_slurm):
    _run(
        fake_slurm,
        "pretrain",
        RECIPE="t5-xxl",
        DATA="text:/data/c4",
        DS_CONFIG="ds_configs/z3_offload.json",
        GPUS_PER_NODE="8",
        TAGI_MASTER_PORT="29999",
    )
    argv = _deepspeed_argv(fake_slurm, 1)
    assert _flag(argv, "--num_gpus") == "8" and _flag(argv, "--master_port") == "29999"
    assert _flag(argv, "--recipe") == "t5-xxl" and _flag(argv, "--data") == "text:/data/c4"
    assert _flag(argv, "--deepspeed") == "ds_configs/z3_offload.json"
    # Default OUT: runs/<stage>-<job id> under the repository root (the job's working directory).
    assert _flag(argv, "--output_dir") == f"runs/pretrain-{JOB_ID}"
    assert (fake_slurm["root"] / "runs" / f"pretrain-{JOB_ID}" / "slurm" / f"hostfile-{JOB_ID}").is_file()


def test_errors_are_reported(fake_slurm):
    script = str(REPO / "launchers" / "slurm" / "pretrain.sbatch")
    env = {k: v for k, v in fake_slurm["env"].items() if k != "SLURM_JOB_ID"}
    proc = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 2 and "not inside a Slurm job" in proc.stderr
    proc = subprocess.run(
        ["bash", script],
        env={**fake_slurm["env"], "GPUS_PER_NODE": "x"},
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert proc.returncode == 2 and "GPUS_PER_NODE" in proc.stderr


def _kill_session(proc):
    """Kill every process of the session ``proc`` leads (node.sh puts the launcher in its own process group)."""
    for pid in [p.pid for p in psutil.process_iter()]:
        try:
            if os.getsid(pid) == proc.pid:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def _wait_for(paths, proc, timeout=HANG_S):
    """Until every path exists; fails at once when the job exits first, and after ``timeout`` s (a hang guard)."""
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {[p.name for p in paths if not p.exists()]} after {timeout} s (job rc={proc.poll()})")
        time.sleep(0.05)


def _wait_until_the_shells_wait(proc, settle_s=10.0):
    """Until every bash of the job (batch shell, srun, node.sh, the fake runner) sits in wait(2): then each has
    set its traps and recorded its children's pids, so a signal sent now is relayed (sent earlier, node.sh could
    get it between starting the launcher and ``group=$!``, and drop it). Where /proc/PID/wchan does not name
    do_wait (a kernel that hides it or names it otherwise), a settle time instead."""
    start = time.monotonic()
    while True:
        shells = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "bash" and _in_session(p, proc)]
        try:
            chans = [Path(f"/proc/{p.pid}/wchan").read_text().strip() for p in shells]
        except OSError:  # a shell that just exited: look again
            chans = []
        if chans and all(c == "do_wait" for c in chans):
            return
        if proc.poll() is not None:
            pytest.fail(f"the job exited (rc={proc.poll()}) before its shells waited")
        if time.monotonic() - start > settle_s:
            return  # no usable wchan: this long after every rank was ready, the shells wait
        time.sleep(0.05)


def _in_session(p, proc) -> bool:
    try:
        return os.getsid(p.pid) == proc.pid
    except (ProcessLookupError, PermissionError):
        return False


@pytest.mark.parametrize(
    "stage,sig,requeue",
    [("finetune", signal.SIGUSR1, True), ("evaluate", signal.SIGUSR1, False), ("pretrain", signal.SIGTERM, False)],
)
def test_signal_reaches_every_rank_and_requeues(fake_slurm, stage, sig, requeue):
    out = fake_slurm["tmp"] / "out"
    log = fake_slurm["log"]
    with open(log / "job.err", "w") as job_err:
        proc = subprocess.Popen(
            ["bash", str(REPO / "launchers" / "slurm" / f"{stage}.sbatch")],
            cwd=fake_slurm["tmp"],
            env={**fake_slurm["env"], "OUT": str(out), "FAKE_RANK_WAIT": "1"},
            stdout=subprocess.DEVNULL,
            stderr=job_err,
            start_new_session=True,  # so a failed test can kill everything it started
        )
        try:
            _wait_for([log / "ready.0", log / "ready.1"], proc)
            _wait_until_the_shells_wait(proc)
            proc.send_signal(sig)  # to the batch shell only, as `#SBATCH --signal=B:USR1@300`
            proc.wait(timeout=HANG_S)
        finally:
            if proc.poll() is None:
                _kill_session(proc)
    err = (log / "job.err").read_text()
    for node in (0, 1):
        assert (log / f"saved.{node}").read_text() == sig.name, err  # the rank's handler ran
    if sig == signal.SIGUSR1:
        assert proc.returncode == 0, err
        for node in (0, 1):
            # The runner (SIGUSR1 ignored) outlived the signal and saw its rank exit 0.
            assert (log / f"runner.{node}.done").read_text().strip() == "runner survived, rank rc=0"
    scontrol = (log / "scontrol.log").read_text()
    assert (f"requeue {JOB_ID}" in scontrol) == requeue  # TERM (scancel, preemption) never requeues
    assert f"got {sig.name}" in err
