"""The repository's top-level ``kernels/`` folder never shadows Hugging Face's ``kernels`` package.

Current transformers imports ``kernels`` (a dependency since 5.2x). ``python -c`` and ``python -m`` started in
the repository root put the root first on ``sys.path``; ``kernels/`` is a plain folder (a PEP 420 namespace
portion), so the installed regular package wins whatever the current directory.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = (
    "import transformers.activations, tagi_ds, tagi_kernels, kernels, os; "
    "assert not kernels.__file__.startswith(os.getcwd() + os.sep), kernels.__file__; "
    "assert callable(tagi_kernels.triton_lora_delta); print('ok', kernels.__file__)"
)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=900)  # hang guard


def test_real_kernels_distribution_is_installed():
    # The shadowing checks below mean something only with the real package present (pulled by transformers
    # and listed in the test extra).
    assert importlib.metadata.version("kernels")


def test_python_c_in_repo_root_imports_transformers_tagi_ds_and_tagi_kernels():
    proc = _run("-c", PROBE)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-2000:]


def test_python_m_in_repo_root_imports_them_too():
    # ``-m`` puts the current directory first on sys.path, as pytest's rootdir insertion does.
    proc = _run("-m", "tests.kernels.import_probe")
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-2000:]


def test_kernels_folder_is_not_a_regular_package():
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert (REPO / "kernels" / "tagi_kernels" / "__init__.py").is_file()
