"""Files whole or not at all, and files read with errors that name them: the package's one atomic writer
(:func:`atomic_write`, :func:`atomic_dir`, :func:`replace_dir`) and its one :func:`read_json`.

Standard library only, below data/ and runtime/: the config's readers (artifacts, checkpoints, a model dir) and the
data's readers (SNI, P3, corpus files) use the same functions and get the same one-line error (``FileError``, which
is both a ``ConfigError`` and a ``DataError``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tagi_ds.errors import FileError

__all__ = [
    "atomic_dir",
    "atomic_write",
    "check_json_lines",
    "read_json",
    "read_text",
    "replace_dir",
    "usual_permissions",
]


# -- writing --------------------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """``path`` holds ``data`` whole (str: UTF-8), or is untouched and no temp file is left (a full disk, a
    read-only folder: the OSError is raised as it came). The temp file lives beside ``path`` (same filesystem, so
    the rename is atomic) and is fsynced first (a crash after the rename keeps the new content). Its mode is the
    one a plain ``open(path, "w")`` gives, ``0o666`` less the umask (0644 under the usual umask 022), not the 0600
    ``mkstemp`` creates: weight files and results are readable by the group as before."""
    path = Path(path)  # its folder must exist: a checkpoint's folder that vanished is an error, not made again
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def usual_permissions(path: str | os.PathLike) -> None:
    """Give ``path`` the mode :func:`atomic_write` gives (0644 under umask 022): safetensors' ``save_file``
    creates 0600, which hides weights from the group that shares a run directory."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process umask, read from /proc (Linux >= 4.7) without changing it: setting it to read it (below, the
    fallback) briefly gives another thread's new files mode 0666 (the heartbeat thread writes while ranks save)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the complete directory ``tmp`` at ``final`` (an older ``final`` is removed first: a directory cannot
    be renamed over a non-empty one). A reader sees the old directory, none, or the new one; never half of one."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Fill the yielded temp directory (beside ``final``); on success it becomes ``final`` (:func:`replace_dir`),
    on any failure it is removed and ``final`` is untouched."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- reading --------------------------------------------------------------------------------------------------
def read_text(path: str | os.PathLike, where: str | None = None) -> str:
    """The file decoded as strict UTF-8; ``FileError`` ``<where>: <what>`` (``where`` defaults to the path)."""
    where = where or str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileError(f"{where}: missing") from None
    except OSError as err:
        raise FileError(f"{where}: cannot read it ({err.strerror})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FileError(f"{where}: not UTF-8: byte {raw[err.start]:#04x} at offset {err.start}") from None


def read_json(path: str | os.PathLike, where: str | None = None, keys: tuple[str, ...] = ()) -> Any:
    """A JSON file that must exist, parse, and (for an object) hold ``keys``; the error names ``where`` (default:
    the path), what is wrong, and the line and column of a syntax error."""
    where = where or str(path)
    try:
        data = json.loads(read_text(path, where))
    except json.JSONDecodeError as err:
        raise FileError(f"{where}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise FileError(f"{where}: no {missing[0]!r} key ({found})")
    return data


def check_json_lines(path: str | os.PathLike) -> None:
    """Raise a ``FileError`` naming the first line of a JSON-lines file that is not a JSON object."""
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise FileError(f"{path}: line {lineno}: invalid JSON at column {err.colno}: {err.msg}") from None
        if not isinstance(obj, dict):
            raise FileError(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
