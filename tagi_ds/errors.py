"""The errors of bad input, and the one rank-0 printer.

Bad input is one line naming the file, the field and the value at fault (README, "Bad input and exit codes");
``runtime.preflight.guarded`` prints it once per job and exits 2. Standard library only: every layer imports this.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

__all__ = ["ConfigError", "DataError", "FileError", "env_rank", "say"]


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and the value."""


class DataError(ValueError):
    """Bad data: the one-line message names the file, the field and the value at fault."""


class FileError(ConfigError, DataError):
    """A file that cannot be read or parsed (``tagi_ds.files``). Both kinds, so that the config's readers and the
    data's readers, which each catch their own, catch it too."""


def env_rank() -> int:
    """This process's global rank as the launcher set it (0 without a launcher; ``runtime.dist.init`` sets it for a
    world of one). The environment, not the process group: it answers before the group exists, and in data/."""
    return int(os.environ.get("RANK", "0") or 0)


def say(line: str, file: TextIO | None = None) -> None:
    """Print ``line`` from rank 0 only (stdout unless ``file``): the one rank-0 printer of the package."""
    if env_rank() == 0:
        print(line, file=file or sys.stdout, flush=True)
