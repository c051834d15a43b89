"""scripts/gpu_session.sh, the stages a lent GPU machine runs, checked on this CPU machine with SMOKE=1: each stage
sets up, runs its benchmark, and leaves the results and its log in $OUT (what the device tool brings back)."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TODAY = datetime.date.today().isoformat()


def session(tmp_path: Path, *args: str, timeout: int = 300) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "BENCH_OUT": str(tmp_path / "results"),
           "TMPDIR": str(tmp_path), "PYTHON": "python", "OMP_NUM_THREADS": "1", "WHEELS": str(tmp_path / "no_wheels")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_session.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, out


def test_plan_stage_leaves_versions_log_and_results_in_out(tmp_path):
    proc, out = session(tmp_path, "plan")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["bench_plan_memory.log", f"cpu_{TODAY}_plan_memory.json", f"cpu_{TODAY}_plan_memory.md",
                     "versions.txt"]
    versions = (out / "versions.txt").read_text()
    assert "torch" in versions and "no CUDA device (CPU)" in versions and "deepspeed" in versions
    assert json.loads((out / f"cpu_{TODAY}_plan_memory.json").read_text())["rows"][0]["status"] == "ok"


def test_train_stage_tags_results_with_the_recipe_and_passes_flags_on(tmp_path):
    proc, out = session(tmp_path, "train", "tiny", "--variants", "tagi", "lora", "--engines", "torch",
                        "--no_checkpointing_table")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    result = json.loads((out / f"cpu_{TODAY}_train_step_tiny.json").read_text())
    (rec,) = result["recipes"]
    assert rec["recipe"] == "tiny" and {(r["variant"], r["engine"]) for r in rec["rows"]} == {
        ("tagi", "torch"), ("lora", "torch")}
    assert (out / "bench_train_step_tiny.log").is_file()


def test_a_failing_step_fails_the_stage_and_still_brings_its_log_back(tmp_path):
    proc, out = session(tmp_path, "plan", "--micro_batch", "0")
    assert proc.returncode == 1
    assert "--micro_batch must be > 0" in (out / "bench_plan_memory.log").read_text()
    assert "== bench_plan_memory failed" in proc.stdout


def test_bad_stage_and_missing_recipe_are_one_line_errors(tmp_path):
    proc, _ = session(tmp_path, "bench")
    assert proc.returncode == 2 and "unknown stage 'bench'" in proc.stdout
    proc, _ = session(tmp_path, "train", "--engines", "torch")
    assert proc.returncode == 2 and "train needs a recipe" in proc.stdout
