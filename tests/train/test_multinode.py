"""The multi-node path on one machine: 2 "nodes" x 1 rank through DeepSpeed's own runner (--no_ssh).

As launchers/slurm/node.sh does per node: one ``deepspeed.launcher.runner`` per node rank, each with the same
hostfile (two host names; --no_ssh still needs it to count the nodes), ``--num_nodes 2 --num_gpus 1
--node_rank R --master_addr 127.0.0.1 --master_port P``. The host names are only labels here: with --no_ssh
the runner starts the local ranks of its own node and the ranks meet at master_addr:master_port (gloo).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.train.harness import HANG_S, REPO, TINY, env, free_port, metrics

pytestmark = pytest.mark.distributed


def test_two_nodes_one_rank_each_train_three_steps(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # two entries: the runner refuses duplicates
    out, port = tmp_path / "run", free_port()
    procs, logs = [], []
    for node_rank in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--hostfile",
            str(hostfile),
            "--num_nodes",
            "2",
            "--num_gpus",
            "1",
            "--node_rank",
            str(node_rank),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            "--no_ssh",
            str(REPO / "launchers" / "pretrain.py"),
            "--output_dir",
            str(out),
            "--max_steps",
            "3",
            *TINY,
        ]
        log = open(tmp_path / f"node{node_rank}.log", "w")  # a file, not a pipe: a full pipe would block a rank
        logs.append(log)
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )
    try:
        deadline = time.monotonic() + HANG_S  # a hang guard for the job, never a speed check
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # this node's runner, launcher and rank (own session)
                p.wait()  # SIGKILL cannot be caught: no limit needed
        for log in logs:
            log.close()
    text = {r: (tmp_path / f"node{r}.log").read_text() for r in (0, 1)}
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"node {r} exited {p.returncode}\n{text[r][-4000:]}"
    assert "nnodes=2" in text[0] and "node_rank=1" in text[1]  # each runner started its own node's rank
    assert "2 rank(s)" in text[0]  # one world across both nodes
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert (out / "checkpoints" / "step-3" / "trainer_rank1.pt").exists()  # the second node's rank saved too
    assert (out / "hypernet").is_dir()
