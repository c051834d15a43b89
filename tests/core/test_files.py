"""tagi_ds/files.py: the one atomic writer and the one read_json (and that no other write-then-rename creeps back)."""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import pytest

from tagi_ds import files
from tagi_ds.config import ConfigError
from tagi_ds.data.task import DataError
from tagi_ds.errors import FileError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_atomic_write_gives_the_mode_open_gives_not_mkstemps_0600(tmp_path, umask):
    files.atomic_write(tmp_path / "w.safetensors", b"\x00" * 8)
    assert mode(tmp_path / "w.safetensors") == 0o644  # umask 022
    umask(0o077)
    files.atomic_write(tmp_path / "private.json", "{}")
    assert mode(tmp_path / "private.json") == 0o600  # the umask is honoured
    assert (tmp_path / "private.json").read_text() == "{}" and sorted(os.listdir(tmp_path)) == [
        "private.json",
        "w.safetensors",
    ]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    (tmp_path / "x.json").write_text("old")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        files.atomic_write(tmp_path / "x.json", "new")
    assert os.listdir(tmp_path) == ["x.json"] and (tmp_path / "x.json").read_text() == "old"


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    final = tmp_path / "hypernet"
    with files.atomic_dir(final) as d:
        (d / "a").write_text("1")
    assert sorted(p.name for p in final.iterdir()) == ["a"]
    with pytest.raises(RuntimeError), files.atomic_dir(final) as d:
        (d / "b").write_text("2")
        raise RuntimeError("a save failed half way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hypernet"]  # no temp dir left
    assert sorted(p.name for p in final.iterdir()) == ["a"]  # the old dir untouched
    with files.atomic_dir(final) as d:
        (d / "c").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["c"]


@pytest.mark.parametrize(
    "content, where, keys, needle",
    [
        (None, None, (), "x.json: missing"),
        (b"{\n  nope", None, (), "x.json: invalid JSON at line 2 column 3"),
        (b"\xff{}", None, (), "x.json: not UTF-8: byte 0xff at offset 0"),
        (b'{"a": 1}', "--hypernet DIR/x.json", ("tagi",), "--hypernet DIR/x.json: no 'tagi' key (['a'])"),
    ],
)
def test_read_json_errors_are_one_line_naming_the_file(tmp_path, content, where, keys, needle):
    path = tmp_path / "x.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(FileError) as info:
        files.read_json(path, where, keys)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg, msg
    # one error, caught by the config's readers and by the data's readers alike
    assert isinstance(info.value, ConfigError) and isinstance(info.value, DataError)


def renames(path: Path) -> list[str]:
    """``file:line`` of every ``os.replace`` / ``os.rename`` call and every one-argument ``.replace`` / ``.rename``
    (``Path.replace``; ``str.replace`` takes two) in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("replace", "rename")
        ):
            continue
        on = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        if on == "os" or (len(node.args) == 1 and on != "dataclasses"):
            out.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return out


def test_one_atomic_writer():
    """Write-then-rename lives in tagi_ds/files.py only. There were 8 copies: data/files.py, runtime/rundir.py,
    artifacts.py, export/peft.py, train/checkpoint.py, train/progress.py, benchmarks/common.py, and in scripts/
    pretrain_backbone.py and make_report.py."""
    found = [
        r
        for place in ("tagi_ds", "benchmarks", "scripts")
        for f in sorted((REPO / place).rglob("*.py"))
        for r in renames(f)
    ]
    assert found and all(r.startswith("tagi_ds/files.py:") for r in found), found
