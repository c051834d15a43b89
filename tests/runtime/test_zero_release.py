"""tagi_ds.runtime.zero_release: after two real ZeRO-3 TAGI engines (2 gloo ranks, 2 steps each) are destroyed in one
process, nothing of theirs is left for the garbage collector once DeepSpeed's two globals are cleared (without it,
DeepSpeed 0.19.8 keeps both models and both optimizers: the benchmarks' OOM at 7B shapes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tagi_ds.runtime import zero_release
from tests.train.harness import REPO, env


@pytest.mark.distributed
def test_two_zero3_engines_in_one_process_leave_nothing_behind_after_release(tmp_path):
    case = REPO / "tests" / "runtime" / "zero_release_case.py"
    cmd = [sys.executable, "-m", "tagi_ds.launch", "--num_gpus", "2", str(case), "--out", str(tmp_path)]
    # Generous: 2 ranks x 2 engines on a loaded 2-core host (~1 min idle).
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    # Each rank's file, not its stdout lines (two ranks' lines on one pipe can interleave: a run lost one that way).
    ranks = {int(p.stem.removeprefix("rank")): json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")}
    assert sorted(ranks) == [0, 1], log[-3000:]
    for r in ranks.values():
        assert r["alive"] == {"TagiModel": 0, "DeepSpeedZeroOptimizer_Stage3": 0}, log[-3000:]
        assert len(r["released"]) == 2, r
        assert all(x["fwd_module_stack"] >= 1 and x["params_to_release"] > 0 for x in r["released"]), r


def test_release_of_one_module_keeps_the_other_engines_entries_in_place():
    """Entries of other (live) engines stay, and the list object is the same one DeepSpeed's hooks read."""
    import torch
    from deepspeed.runtime.zero import parameter_offload

    stack = parameter_offload.FWD_MODULE_STACK
    mine, other = torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.nn.Linear(2, 2)
    saved = list(stack)
    try:
        stack += [other, mine, mine[0]]
        out = zero_release.release(mine)
        assert out["fwd_module_stack"] == 2 and parameter_offload.FWD_MODULE_STACK is stack
        assert stack[-1] is other and not any(m is mine or m is mine[0] for m in stack)
        assert out["params_to_release"] >= 0  # the coordinator's cache was found (deepspeed 0.19's private name)
    finally:
        stack[:] = saved
