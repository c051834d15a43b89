"""Shared test setup: CPU-first, Triton in interpreter mode when there is no GPU."""

import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every job the tests start (also those that call DeepSpeed's runner directly, not tagi_ds.launch) compiles and
# loads DeepSpeed's C++ op from this environment's own folder: one build per venv, not one per folder (torch's
# shared default folder is rebuilt whenever another venv used it last: about a minute of the suite).
from tagi_ds.launch import use_own_extensions_dir  # noqa: E402

use_own_extensions_dir()
torch.set_num_threads(min(2, os.cpu_count() or 1))

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
    # The longest first (``long``, then the 2-rank jobs), in collection order otherwise: under the README's
    # ``-n 2 --dist worksteal`` the two workers then finish together instead of one waiting on a late long test.
    items.sort(key=lambda item: 0 if "long" in item.keywords else 1 if "distributed" in item.keywords else 2)


def pytest_sessionstart(session):
    """The resolved versions first, also under -q: CI installs whatever pip resolves that day."""
    from importlib.metadata import PackageNotFoundError, version

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    names = ("torch", "deepspeed", "transformers", "peft", "triton", "kernels")
    line = "versions: " + ", ".join(f"{n} {v(n)}" for n in names)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)
