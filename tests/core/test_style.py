"""``make style`` inside the suite, so CI checks it too (issue 24: the formatter in make style and CI): ruff's lint
rules and its formatter over the Makefile's STYLE_PATHS, with the settings in pyproject.toml. ruff is pinned to one
minor version in the test extra, since a new minor version may change the format or add rules."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def style_paths() -> list[str]:
    paths = re.search(r"^STYLE_PATHS = (.+)$", (REPO / "Makefile").read_text(encoding="utf-8"), re.M).group(1)
    return paths.split()


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["ruff check", "ruff format --check"])
def test_the_tree_passes_make_style(command):
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", *command, *style_paths()],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard: about a second on 2 idle cores
    )
    assert proc.returncode == 0, f"make style fails (run: ruff {' '.join(command)} ...):\n{proc.stdout[-3000:]}"
