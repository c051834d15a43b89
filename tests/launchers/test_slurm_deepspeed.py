"""launchers/slurm + the real DeepSpeed runner: the SIGUSR1 stop-and-save path end to end (~10-20 s on CPU).

Same fake scontrol/srun as tests/launchers/test_slurm.py, but `deepspeed` is the real one: two fake nodes on this
machine, one gloo rank each, rendezvous through --no_ssh --node_rank. Checks the claim common.sh relies on:
the DeepSpeed runner and deepspeed.launcher.launch, started with SIGUSR1 ignored, survive the signal while
the training processes (which install a handler) get it.
"""

import shutil
import signal
import subprocess

import pytest

from tagi_ds.launch import free_port
from tests.launchers.test_slurm import (
    HANG_S,
    JOB_ID,
    REPO,
    _kill_session,
    _make_env,
    _wait_for,
    _wait_until_the_shells_wait,
)

pytestmark = pytest.mark.distributed


# A launcher that keeps the stop-and-save contract: gloo rendezvous across the two fake nodes, then wait;
# on SIGUSR1 write checkpoints/latest and exit 0.
CONTRACT_LAUNCHER = """\
import argparse, os, signal, sys, time
from pathlib import Path

stop = []
signal.signal(signal.SIGUSR1, lambda signum, frame: stop.append(signum))
parser = argparse.ArgumentParser()
for flag in ("--local_rank", "--deepspeed", "--recipe", "--data", "--output_dir", "--resume_from_checkpoint"):
    parser.add_argument(flag)
args = parser.parse_args()
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, out = dist.get_rank(), Path(args.output_dir)
total = torch.tensor([rank + 1.0])
dist.all_reduce(total)
(out / f"world.{rank}").write_text(f"{dist.get_world_size()} {total.item()}")
(out / f"ready.{rank}").write_text("")
deadline = time.monotonic() + 900  # the test signals once both ranks are ready; this only ends an orphan
while not stop and time.monotonic() < deadline:
    time.sleep(0.05)
dist.barrier()  # every rank got the signal: save collectively
if rank == 0:
    (out / "checkpoints").mkdir(exist_ok=True)
    (out / "checkpoints" / "latest").write_text("global_step1")
(out / f"saved.{rank}").write_text(str(stop))
dist.barrier()
dist.destroy_process_group()
sys.exit(0 if stop else 3)
"""


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="needs the deepspeed launcher")
def test_real_deepspeed_stop_save_requeue(tmp_path):
    """The real DeepSpeed runner (--no_ssh, 2 nodes x 1 rank over gloo): SIGUSR1 to the batch shell reaches
    both ranks through runner and launcher (which must survive it), the job saves and requeues. (That the
    requeued run adds --resume_from_checkpoint latest is test_composed_command's job.)"""
    fake = _make_env(tmp_path, fake_deepspeed=False)
    (fake["root"] / "launchers" / "pretrain.py").write_text(CONTRACT_LAUNCHER)
    out = tmp_path / "out"
    env = {
        **fake["env"],
        "OUT": str(out),
        "GPUS_PER_NODE": "1",
        "TAGI_MASTER_ADDR": "127.0.0.1",
        "TAGI_MASTER_PORT": str(free_port()),  # not a guess from the pid: another job may hold it
    }
    script = str(REPO / "launchers" / "slurm" / "pretrain.sbatch")
    log_path = tmp_path / "job.log"  # a file, not a pipe: DeepSpeed's logging must never block on it
    with open(log_path, "w") as job_log:
        # Own session, so a failed test can kill everything it started.
        proc = subprocess.Popen(
            ["bash", script], cwd=tmp_path, env=env, stdout=job_log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            _wait_for([out / "ready.0", out / "ready.1"], proc, timeout=2 * HANG_S)  # two DeepSpeed runners start
            _wait_until_the_shells_wait(proc)
            proc.send_signal(signal.SIGUSR1)  # to the batch shell only, as `--signal=B:USR1@300`
            proc.wait(timeout=HANG_S)
        finally:
            if proc.poll() is None:
                _kill_session(proc)
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    assert (out / "world.0").read_text() == (out / "world.1").read_text() == "2 3.0"
    assert (out / "checkpoints" / "latest").read_text() == "global_step1"
    assert (out / "saved.0").read_text() == (out / "saved.1").read_text() == f"[{int(signal.SIGUSR1)}]"
    assert f"requeue {JOB_ID}" in (fake["log"] / "scontrol.log").read_text()
