"""The GPU code path of the LoRA kernels (v1 and the fused adapted linear) compiles for sm_90 in bf16/fp16/fp32, with
its shared memory and registers printed and under sm_90's limit, checked on a machine without a GPU;
``TAGI_KERNELS_TUNE=fixed`` (the GPU test stage's flag) leaves one autotune config per kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_kernels_compile_for_sm90_with_the_fixed_tuning_space():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TAGI_KERNELS_TUNE"] = "fixed"
    script = Path(__file__).with_name("aot_compile.py")
    # --all: every config of the (fixed, one-config) space, i.e. exactly what the GPU tests compile per variant.
    proc = subprocess.run(
        [sys.executable, str(script), "--all"], env=env, capture_output=True, text=True, timeout=1500
    )  # a hang guard sized for a loaded 2-core host (~90 s at load 8)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "tune=fixed configs: shrink=1 expand=1 seg_reduce=1" in proc.stdout
    # bf16 and fp32: 2 shrinks, 3 expands, 2 reductions, 1 partial sum and 6 fused-linear launches (forward and
    # dgrad, shrink fused or split, ranks 16 and 64); fp16: the 2 shrinks and the fused forward.
    assert proc.stdout.count("smem=") == 31
    assert proc.stdout.count("fused_linear_kernel") == 13 and "regs=?" not in proc.stdout


def test_bad_tuning_flag_is_refused():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TAGI_KERNELS_TUNE"] = "fast"
    proc = subprocess.run(
        [sys.executable, "-c", "import tagi_kernels"], env=env, capture_output=True, text=True, timeout=900
    )  # a hang guard only (issue 29)
    assert proc.returncode != 0 and "TAGI_KERNELS_TUNE must be 'full' or 'fixed', got 'fast'" in proc.stderr
