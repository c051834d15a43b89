"""The environment a rank process starts in, shared by the launcher (``tagi_ds.launch``) and the process group
(``runtime/dist.py``): a free rendezvous port, this Python environment's own folder for DeepSpeed's compiled ops.

Standard library only: ``python -m tagi_ds.launch`` imports it before anything heavy.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from pathlib import Path

__all__ = ["free_port", "use_own_extensions_dir"]


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it; another process could still take it first)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_own_extensions_dir() -> str:
    """Give this Python environment its own folder for the C++ ops DeepSpeed compiles at first use (on CPU its
    shared-memory allreduce, ~1 minute on 2 cores), unless ``TORCH_EXTENSIONS_DIR`` is set.

    torch's default folder is shared by every environment of one Python version, and a build records the
    torch it was compiled against: two virtual envs used in turn (a fresh CI env beside a dev env) recompile
    the op at every switch, and a process can load the library while another rebuilds it."""
    key = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    default = Path.home() / ".cache" / "torch_extensions" / f"tagi-{key}"
    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(default))
