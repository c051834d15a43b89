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


@pytest.fixture(scope="session")
def once(tmp_path_factory, worker_id):
    """``once(name, make)``: run ``make(dir)`` (an expensive set-up: a real run whose outputs several tests read)
    once per test session, not once per pytest-xdist worker; returns ``(dir, value)``, ``value`` being what ``make``
    returned (JSON). Under ``-n 2 --dist worksteal`` the tests of one module-scoped fixture can land on both
    workers, and each worker used to repeat the fixture's runs (a 2-rank distillation fixture ran twice in one
    suite: ~1 min of the 2 cores). The first worker to ask runs it under a file lock in the session's shared
    temporary folder; the other waits for it (its result is the same), then reads the files. A failed ``make``
    leaves nothing: the next one to ask tries again, and fails the same way."""
    import json
    import shutil

    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base if worker_id == "master" else base.parent  # pytest-N/, shared by every worker of this session

    def run(name: str, make):
        folder, done = root / f"once-{name}", root / f"once-{name}.json"
        with FileLock(str(root / f"once-{name}.lock")):
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
                folder.mkdir()
                done.write_text(json.dumps(make(folder)))
        return folder, json.loads(done.read_text())

    return run
