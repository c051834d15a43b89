"""Preflight: every input of a run is checked before anything is written or any process group starts.

The contract (README, "Bad input and exit codes"). A failure the user can cause (a flag, a config key or
value, the DeepSpeed JSON, a data source, an artifact or checkpoint the run reads, the output directory)
ends the run with one line on stderr, ``error: <where>: <what> (<value>)``, and exit code 2, before the run
directory appears. Entry points raise ``ConfigError`` / ``DataError``; :func:`guarded` prints the line once
per job and exits.

Every rank runs the same checks on the same inputs without talking to the others (no process group exists
yet), so every rank fails alike. Rank 0 prints; the others wait before exiting, so that the launcher, which
ends the job when the first rank exits, does not cut rank 0 off before it has printed. A rank that fails
alone (a file missing on one node only) still reports, after that wait, with its rank named.

Module-level imports stay light (``--help`` must not pay for torch); the checks import what they need.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from tagi_ds.config import ConfigError
from tagi_ds.errors import env_rank, say
from tagi_ds.files import read_json

EXIT_USAGE = 2  # bad input: nothing was written
EXIT_BAD_STEPS = 3  # train.max_bad_steps non-finite steps in a row: checkpoint saved, run stopped
EXIT_SAVE_FAILED = 4  # a checkpoint (or config.json) could not be written: the previous checkpoint is kept, run stopped
PEER_REPORT_DELAY_S = 10.0  # a rank > 0 waits this long before printing its own error and exiting


class Stopped(Exception):  # noqa: N818  (not an error of the program: an orderly stop with its own exit code)
    """An orderly stop with its own exit code; the message was already printed (rank 0) before all ranks left."""

    exit_code = 1


class WriteFailed(Stopped):
    """A file of the run (a checkpoint, config.json) could not be written: one line printed, previous state kept."""

    exit_code = EXIT_SAVE_FAILED


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def fail(where: str, what: str, value: Any = None) -> NoReturn:
    raise ConfigError(f"{where}: {what}" + ("" if value is None else f" ({value})"))


def say_once(line: str) -> None:
    """``line`` on stderr, from rank 0 only (``tagi_ds.errors.say``, the one rank-0 printer)."""
    say(line, file=sys.stderr)


def report(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """``error: <message>`` once per job (see the module docstring), then exit with ``code``."""
    rank = env_rank()
    if rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(PEER_REPORT_DELAY_S)  # normally the launcher ends this rank here, after rank 0 reported
        print(f"error: rank {rank}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def guarded(main: Callable[[], object]) -> None:
    """Run an entry point's ``main``: user errors become the one-line report and exit code 2, orderly stops
    their own exit code; anything else (a bug) keeps its traceback."""
    from tagi_ds.data.task import DataError
    from tagi_ds.runtime import watchdog

    try:
        main()
    except (ConfigError, DataError) as err:
        watchdog.record_end(EXIT_USAGE)
        report(str(err).replace("\n", " "))
    except Stopped as err:
        watchdog.record_end(err.exit_code)
        raise SystemExit(err.exit_code) from None
    except SystemExit as err:
        watchdog.record_end(err.code if isinstance(err.code, int) else 1)
        raise
    except BaseException as err:
        if watchdog.is_peer_loss(err):
            # A peer died or froze mid-collective: tagi_ds.launch names it in one line; this rank's gloo/NCCL
            # traceback would only bury that line. os._exit: a process group with a dead peer can hang in
            # the interpreter's teardown (destroy_process_group waits for it).
            watchdog.record_end(watchdog.EXIT_PEER_LOST, str(err).splitlines()[0][:300])
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(watchdog.EXIT_PEER_LOST)
        watchdog.record_end(1)
        raise
    from tagi_ds.runtime import dist

    dist.shutdown()
    watchdog.record_end(0)


# -- command line ---------------------------------------------------------------------------------------------
def check_argv(argv: list[str]) -> None:
    """Command-line arguments that are not valid UTF-8 (Python keeps their bytes as surrogates) are refused
    here, by the flag they belong to, before they reach a file name, a tokenizer or a JSON file."""
    for i, arg in enumerate(argv):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            flag, _, value = arg.partition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
            where = flag or (argv[i - 1] if i and argv[i - 1].startswith("-") else f"argument {i + 1}")
            fail(where, "not valid UTF-8", os.fsencode(value))


# -- output directory -----------------------------------------------------------------------------------------
def check_output_dir(path: str | Path, flag: str = "--output_dir") -> Path:
    """``path`` is a directory or can be created as one, and this process can create files in it.

    Nothing is left behind: writability is probed with a temporary directory in the deepest existing
    ancestor, removed at once (``os.access`` cannot tell, e.g. for root or on read-only mounts)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        fail(flag, "exists and is not a directory", path)
    base = next((a for a in (path.absolute(), *path.absolute().parents) if a.exists() or a.is_symlink()), None)
    if base is None or not base.is_dir():
        fail(flag, f"cannot be created: {base} is not a directory", path)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".tagi-write-probe-", dir=base))
    except OSError as err:
        fail(flag, f"cannot create files under {base} ({err.strerror})", path)
    return path


# -- DeepSpeed JSON -------------------------------------------------------------------------------------------
class _Reads(dict):
    """A dict that records which top-level keys are read: DeepSpeed silently ignores a key it never reads."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        self.read.add(key)
        return super().__contains__(key)


@contextlib.contextmanager
def _quiet_deepspeed():
    import logging

    from deepspeed.utils import logger

    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def deepspeed_config(path: str | None, cfg, world_size: int) -> dict[str, Any]:
    """The final DeepSpeed dict of a run (``--deepspeed`` + what the config injects), checked against
    DeepSpeed's schema first (:func:`check_deepspeed`)."""
    import torch.distributed as td

    from tagi_ds.runtime import engine

    path = path or str(engine.default_ds_config(cfg.recipe))  # tiny recipes: z3_tiny.json
    raw = engine.load_ds_json(path)
    # DeepSpeedConfig checks the batch against the world it sees: one rank without a process group (preflight
    # before init), the group's size inside one (a driver that runs several stages in one launch).
    seen = td.get_world_size() if td.is_initialized() else 1
    check_deepspeed(engine.inject(raw, cfg, seen), f"--deepspeed {path}")
    return engine.inject(raw, cfg, world_size)


def check_deepspeed(ds: dict[str, Any], where: str) -> None:
    """Validate a final DeepSpeed dict (as injected for one rank) with DeepSpeed's own config classes and
    their pydantic schemas, and refuse top-level keys DeepSpeed never reads. Errors are one line naming the
    key path, e.g. ``zero_optimization.stage``."""
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
    from pydantic import ValidationError

    reads = _Reads(ds)
    try:
        with _quiet_deepspeed():
            DeepSpeedConfig(reads)  # without a process group it assumes one rank: ``ds`` is injected for one
    except ValidationError as err:
        first = err.errors()[0]
        fail(where, f"{_locate(ds, first['loc'], err.title)}: {first['msg']}", repr(first.get("input")))
    except (DeepSpeedConfigError, AssertionError, ValueError, TypeError, KeyError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        fail(where, f"DeepSpeed rejects it: {text}")
    unread = [k for k in ds if k not in reads.read]
    if unread:
        fail(
            where,
            f"{unread[0]}: not a DeepSpeed {deepspeed.__version__} setting (DeepSpeed never reads it)",
            repr(ds[unread[0]]),
        )


def _locate(ds: dict[str, Any], loc: tuple, model: str) -> str:
    """The JSON path of a pydantic error: DeepSpeed validates each section on its own, so ``loc`` is relative
    to the section; find the section that holds it."""
    rel = ".".join(str(p) for p in loc)
    for key, section in ds.items():
        node = section
        for part in loc:
            if isinstance(node, dict) and part in node:
                node = node[part]
            else:
                break
        else:
            return f"{key}.{rel}"
    return f"{rel} (in {model})" if rel else model


# -- files an artifact or checkpoint holds --------------------------------------------------------------------
def safetensors_header(path: Path, where: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor: (dtype, shape)}`` from a safetensors file's header, after checking that the file is whole
    (its size is exactly header + the data the header describes): a truncated copy fails here."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                fail(where, "not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            size = path.stat().st_size
            if n > size - 8:
                fail(where, f"truncated safetensors file (header of {n} bytes, file of {size})")
            header = json.loads(f.read(n))
    except OSError as err:
        fail(where, f"cannot read it ({err.strerror})")
    except (UnicodeDecodeError, json.JSONDecodeError):
        fail(where, "not a safetensors file (its header is not JSON)")
    if not isinstance(header, dict):
        fail(where, "not a safetensors file (its header is not a JSON object)")
    out, end = {}, 0
    try:
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            out[name] = (meta["dtype"], tuple(int(d) for d in meta["shape"]))
            end = max(end, int(meta["data_offsets"][1]))
    except (KeyError, TypeError, ValueError, IndexError):
        fail(where, f"not a safetensors file (bad header entry {name!r})")
    if 8 + n + end != size:
        fail(where, f"truncated or padded safetensors file ({size} bytes, the header describes {8 + n + end})")
    return out


def check_zip(path: Path, where: str) -> None:
    """A torch ``.pt`` file (a zip archive) is whole: its central directory, at the end, is readable."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as z:
            bad = next((i.filename for i in z.infolist() if i.header_offset + i.compress_size > size), None)
    except (OSError, zipfile.BadZipFile) as err:
        fail(where, f"{path.name} is unreadable or truncated ({err})")
    if bad is not None:
        fail(where, f"{path.name} is truncated (member {bad} runs past the end)")


# -- the model, without memory --------------------------------------------------------------------------------
def meta_pretrained(cfg):
    """``model.model_name_or_path``'s backbone on the meta device (``tagi_ds.assembly.meta_model``): its
    config.json read and checked, the weight files' headers checked against it."""
    import transformers

    from tagi_ds import families
    from tagi_ds.backbones.base import DTYPES, check_attention, check_model_dir

    path = check_model_dir(cfg.model.model_name_or_path)
    read_json(path / "config.json", f"--model_name_or_path {path}/config.json", ("model_type",))
    family = families.get(cfg.model.arch)  # its record names the class and the model_type to expect
    model_type, model_cls = family.model_type, getattr(transformers, family.model_class)
    try:
        hf_cfg = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        fail(f"--model_name_or_path {path}", f"config.json is not a transformers config ({err})")
    if hf_cfg.model_type != model_type:
        fail(
            f"--model_name_or_path {path}",
            f"a {hf_cfg.model_type} checkpoint, but model.arch={cfg.model.arch}",
            hf_cfg.model_type,
        )
    backbone = model_cls._from_config(
        hf_cfg, attn_implementation=check_attention(cfg.model), dtype=DTYPES[cfg.model.dtype]
    )
    check_weights(path, backbone.state_dict())
    return backbone


def check_weights(path: Path, expected: dict[str, Any]) -> None:
    """The checkpoint dir's weight files are whole, and every tensor they share with the model has its shape."""
    files = sorted(path.glob("*.safetensors"))
    if not files and not list(path.glob("*.bin")):
        fail(f"--model_name_or_path {path}", "no weights (*.safetensors or *.bin)")
    for f in files:
        for name, (_, shape) in safetensors_header(f, f"--model_name_or_path {f}").items():
            if name in expected and tuple(expected[name].shape) != shape:
                fail(
                    f"--model_name_or_path {f}",
                    f"tensor {name} has shape {shape}, config.json says {tuple(expected[name].shape)}",
                )
    for f in sorted(path.glob("*.bin")):
        check_zip(f, f"--model_name_or_path {f}")
