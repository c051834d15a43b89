"""The LoRA kernel benchmark runs end to end on a tiny grid and writes its JSON + Markdown results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_bench_lora_kernel_smoke(tmp_path):
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # so case 4 (the Triton kernel) runs too, at tiny shapes
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_lora_kernel.py"), "--smoke", "--out_dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )  # a hang guard: ~55 s at load 4 on 2 shared cores
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) == 2 and not any(n.startswith(".") for n in written), written  # no temp files left
    result = json.loads(next(tmp_path.glob("*_lora_kernel.json")).read_text())
    assert result["benchmark"] == "lora_kernel" and result["smoke"] is True
    assert len(result["rows"]) == 4  # d {32} x r {4, 8} x tasks {1, 4}
    tol = 1e-4 if result["dtype"] == "fp32" else 3e-2  # bf16 by default on GPU
    for row in result["rows"]:
        assert row["base_ms"] > 0 and row["loop_ms"] > 0 and row["torch_ms"] > 0 and row["input_sets"] >= 2
        assert abs(row["torch_x"] - row["torch_ms"] / row["base_ms"]) < 1e-9
        triton_cases = ("triton", "triton_add", "triton_linear", "fused", "fused_split")
        for case in ("torch", *triton_cases):  # the Triton paths ran and agreed
            assert row[f"{case}_ms"] > 0 and row[f"{case}_host_ms"] > 0
            # Against float64, never exactly 0 (a 0 would mean the comparison is vacuous, as the old column was),
            # for each of y, dx, dA, dB.
            assert 0 < row[f"{case}_err"] < tol, (case, row[f"{case}_err"])
            parts = [row[f"{case}_err_{p}"] for p in ("y", "dx", "dA", "dB")]
            assert all(0 < e < tol for e in parts) and row[f"{case}_err"] == max(parts), (case, parts)
        assert row["best_triton_ms"] == min(row[f"{c}_ms"] for c in triton_cases)
        assert row["fused_floor_x"] > 1
    md = next(tmp_path.glob("*_lora_kernel.md")).read_text()
    table_lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert table_lines[0].startswith("| d | r | tasks | base ms |") and len(table_lines) == 1 + len(result["rows"])
    assert "err triton" in table_lines[0] and "err fused y/dx/dA/dB" in table_lines[0] and "nan" not in md.lower()
    assert result["complete"] is True and "PARTIAL" not in md and result["copy_TBps"] > 0
    assert "caches reset before every point" in result["autotune"] and "autotune: caches reset" in md
    assert md.splitlines()[-1] in proc.stdout  # the table is printed too


def test_bench_writes_partial_results_after_every_point(tmp_path, monkeypatch):
    """A run cut short keeps the points it finished: the files are written after each point, marked partial."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_lora_kernel", ROOT / "benchmarks" / "bench_lora_kernel.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []
    real = bench.bench_point

    def point(d, r, tasks, args, harness):
        if calls:
            raise KeyboardInterrupt  # the budget's timeout, as far as the files are concerned
        calls.append(d)
        return real(d, r, tasks, args, harness)

    monkeypatch.setattr(bench, "bench_point", point)
    try:
        bench.main(["--smoke", "--device", "cpu", "--cases", "base", "torch", "--out_dir", str(tmp_path)])
    except KeyboardInterrupt:
        pass
    result = json.loads(next(tmp_path.glob("*_lora_kernel.json")).read_text())
    assert result["complete"] is False and len(result["rows"]) == 1
    assert "PARTIAL" in next(tmp_path.glob("*_lora_kernel.md")).read_text()
