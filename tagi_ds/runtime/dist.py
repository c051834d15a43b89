"""Rank discipline in one place: who am I, barriers, agreeing on a decision, rank-0 side effects."""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import re
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from tagi_ds.runtime.environment import free_port, use_own_extensions_dir

# A collective that waits longer than this means a peer died; the deepspeed launcher then tears the job
# down, but a bounded timeout guarantees no rank hangs forever on its own.
COLLECTIVE_TIMEOUT = timedelta(seconds=int(os.environ.get("TAGI_COLLECTIVE_TIMEOUT_S", "60")))


def init(backend: str | None = None) -> None:
    """Join the process group the launcher described (env:// vars), or a group of one without a launcher."""
    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:  # plain `python launchers/x.py`: a world of one
        os.environ.update(
            {
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": os.environ.get("MASTER_PORT") or str(free_port()),
            }
        )
    use_own_extensions_dir()  # before DeepSpeed compiles its CPU allreduce op (first use only)
    import deepspeed

    atexit.register(_destroy_at_exit)

    with _without_op_built_line():
        deepspeed.init_distributed(
            dist_backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"), timeout=COLLECTIVE_TIMEOUT
        )
    _unlink_shm_allreduce_buffer()
    from tagi_ds.runtime import watchdog

    watchdog.start_beating(dist.get_rank())  # under tagi_ds.launch: a dead or frozen rank is named (watchdog.py)


@contextlib.contextmanager
def _without_op_built_line():
    """DeepSpeed prints ``DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully`` at every start,
    once per rank (``deepspeed/comm/torch.py: build_shm_op``, an unconditional print, also when the op was built
    long ago): the one line of every job's log that says nothing. Whatever else is printed meanwhile is kept."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        kept = [
            line
            for line in buffer.getvalue().splitlines(keepends=True)
            if not re.fullmatch(r"DeepSpeed \S+ built successfully\n?", line)
        ]
        sys.stdout.write("".join(kept))
        sys.stdout.flush()


def _destroy_at_exit() -> None:
    # Whatever ended the process (a script's last line, an error): a process group left to the interpreter's
    # teardown can abort it ("terminate called without an active exception") after its work was done.
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def shutdown() -> None:
    """End the process group once every rank is done (an entry point that finished). Left to the interpreter's
    exit, gloo's threads can outlive their process group: "terminate called without an active exception"
    (SIGABRT) on a rank that had finished its work, and on CUDA a warning from torch at every exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


SHM_DIR = Path("/dev/shm")


def shm_allreduce_buffer(rank_: int) -> Path:
    """The /dev/shm segment DeepSpeed's CPU shared-memory allreduce creates for ``rank_`` of this job
    (``deepspeed/ops/csrc/cpu/comm/shm.cpp``: prefix, uid, MASTER_ADDR, MASTER_PORT, rank)."""
    return SHM_DIR / (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
        f"{os.environ.get('MASTER_PORT')}_{rank_}"
    )


def _unlink_shm_allreduce_buffer() -> None:
    """DeepSpeed's CPU backend maps one ~70 MB /dev/shm segment per rank and never unlinks it, so every CPU
    run used to leave its segments behind until the machine ran out of memory. ``init_distributed`` returns
    only after this rank has mapped every peer's segment; after a barrier every rank has, so each rank
    unlinks its own name. The mappings stay valid; the memory is freed when the last process exits."""
    if dist.get_world_size() > 1:
        dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        shm_allreduce_buffer(dist.get_rank()).unlink()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank if ``flag`` is true on any rank: all ranks take the same decision."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device or _device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj):
    """Every rank's ``obj`` on rank 0 as a list (None elsewhere); a collective: all ranks call it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    box = [None] * dist.get_world_size() if is_main() else None
    dist.gather_object(obj, box, dst=0)
    return box


def _device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device() -> torch.device:
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")
