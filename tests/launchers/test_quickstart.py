"""launchers/quickstart.sh prints each command exactly as it runs it (a log line copied into a shell must do what
the quickstart did: `python -m tagi_ds.launch` on a free port, not the plain `deepspeed` on port 29500)."""

import shutil
import subprocess
import sys

import pytest

from tests.train.harness import REPO

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or sys.platform == "win32", reason="needs bash")

# Stands in for `python` on PATH: records each argv, runs nothing.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
"""


def test_every_printed_command_is_the_command_that_ran(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    log, out = tmp_path / "ran.log", tmp_path / "qs"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_LOG": str(log), "OUT": str(out), "NP": "3", "STEPS": "7"}
    # A hang guard only (the script runs 8 no-op commands); sized for a loaded machine.
    proc = subprocess.run(
        ["bash", str(REPO / "launchers" / "quickstart.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    printed = [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]
    ran = log.read_text().splitlines()
    assert [f"python {args}" for args in ran] == printed and len(printed) == 8
    assert not any("deepspeed --num_gpus" in line for line in proc.stdout.splitlines())
    launches = printed[:7]
    assert all(p.startswith("python -m tagi_ds.launch --num_gpus 3 launchers/") for p in launches)
    assert all("--max_steps 7" in p for p in launches[:4])
    assert printed[-1].startswith(f"python -m tagi_ds.eval.table concat={out}/eval/concat")
