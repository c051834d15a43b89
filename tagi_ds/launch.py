"""``python -m tagi_ds.launch [deepspeed options] launchers/STAGE.py [flags]``: the deepspeed launcher, on a free port.

The plain ``deepspeed`` launcher rendezvouses on port 29500 unless told otherwise, so a second job on the same
machine (the test suite, another experiment) dies with EADDRINUSE, sometimes minutes in. This wrapper passes
every option through to DeepSpeed's own runner and adds:

- ``--master_port``: the one given, else ``$MASTER_PORT``, else a port the OS reports free; printed either way;
- ``--log_level critical`` for the runner unless given (its INFO lines repeat the command and the world layout;
  its one ERROR line, "CMD exits with return code = N", names the last rank's command whatever rank failed, and
  every failure already says what it is: the rank's own ``error:`` line, its traceback, or the watchdog's line);
- ``DS_ACCELERATOR=cpu`` on a machine without CUDA (otherwise every process warns that it fell back to CPU);
- ``TORCH_EXTENSIONS_DIR`` per Python environment unless set (:func:`use_own_extensions_dir`);
- a watchdog (``tagi_ds/runtime/watchdog.py``): a rank that dies or stops responding ends the job within seconds
  with one line naming the rank, its signal or exit code, the last complete checkpoint and the resume command
  (exit code 6). ``--rank_timeout S`` (this wrapper's own option, before the script; default 30): how long a
  rank may go without a heartbeat before it counts as frozen (raise it for a debugger session).

Usage is the deepspeed launcher's: ``python -m tagi_ds.launch --num_gpus 2 launchers/pretrain.py --max_steps 5``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from tagi_ds.runtime.environment import free_port, use_own_extensions_dir


def _options(argv: list[str]) -> list[str]:
    """The runner's own options: what comes before the script (the first ``*.py`` argument)."""
    script = next((i for i, a in enumerate(argv) if a.endswith(".py")), len(argv))
    return argv[:script]


def _has(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in _options(argv))


def runner_argv(argv: list[str], env: dict[str, str]) -> tuple[list[str], str]:
    """The deepspeed runner's argv with the port (and quieter logging) added, and where the port came from.

    Options are only added in front of ``argv``: the runner stops reading its own options at the script,
    and anything after it belongs to the script."""
    extra: list[str] = []
    if _has(argv, "--master_port"):
        source = "--master_port"
    else:
        port, source = (env["MASTER_PORT"], "MASTER_PORT") if env.get("MASTER_PORT") else (str(free_port()), "free")
        extra += ["--master_port", port]
    if not _has(argv, "--log_level") and not _has(argv, "--quiet"):
        extra += ["--log_level", "critical"]
    return extra + argv, source


def port_of(argv: list[str]) -> str:
    argv = _options(argv)
    for i, a in enumerate(argv):
        if a.startswith("--master_port="):
            return a.split("=", 1)[1]
        if a == "--master_port" and i + 1 < len(argv):
            return argv[i + 1]
    return "?"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        if not argv:
            raise SystemExit(2)
        return
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    use_own_extensions_dir()
    timeout, argv = _rank_timeout(argv)
    full, source = runner_argv(argv, dict(os.environ))
    how = {
        "free": "a free port; set MASTER_PORT or --master_port to choose",
        "MASTER_PORT": "from MASTER_PORT",
        "--master_port": "from --master_port",
    }[source]
    print(f"tagi-ds launch: rendezvous on port {port_of(full)} ({how})", flush=True)
    from deepspeed.launcher.runner import main as ds_main

    from tagi_ds.runtime import watchdog

    # Ctrl-C reaches every process of the job: the ranks save and stop (train/guards.py), DeepSpeed's launch.py
    # passes a SIGTERM on and waits for them. The runner here has no handler on one node and died with a
    # KeyboardInterrupt traceback before the ranks had saved; ignoring it lets the runner wait for them.
    # (A SIGINT handler, not SIG_IGN: an ignored signal would stay ignored in the processes it starts.)
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    job = Path(tempfile.mkdtemp(prefix="tagi-job-"))
    os.environ[watchdog.JOB_ENV] = str(job)  # the runner passes its environment on to every rank
    dog = watchdog.Watchdog(job, timeout).start()
    code = 0
    try:
        ds_main(full)
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    finally:
        dog.stop()
        failure, lost = dog.failure, _peer_loss(dog)
        shutil.rmtree(job, ignore_errors=True)
    if failure is not None:
        print(_report_line(failure, argv), file=sys.stderr, flush=True)
        raise SystemExit(watchdog.EXIT_RANK_LOST)
    if lost is not None:  # a rank lost its peers with none of them found dead (e.g. a network failure)
        print(
            f"error: rank {lost[0]} lost contact with the other ranks mid-collective ({lost[1]}); "
            "resume with --resume_from_checkpoint latest",
            file=sys.stderr,
            flush=True,
        )
    if code:
        raise SystemExit(code)


def _peer_loss(dog) -> tuple[int, str] | None:
    import json

    for end in sorted(dog.job.glob("rank-*.end")):
        with contextlib.suppress(OSError, ValueError):
            if msg := json.loads(end.read_text()).get("peer_lost"):
                return int(end.stem.split("-")[1]), msg
    return None


def _rank_timeout(argv: list[str]) -> tuple[float, list[str]]:
    """``--rank_timeout S`` taken out of the runner's options (DeepSpeed's runner would refuse it)."""
    from tagi_ds.runtime.watchdog import RANK_TIMEOUT_S

    opts = _options(argv)
    for i, a in enumerate(opts):
        if a == "--rank_timeout" or a.startswith("--rank_timeout="):
            value = a.split("=", 1)[1] if "=" in a else (opts[i + 1] if i + 1 < len(opts) else "")
            try:
                seconds = float(value)
                if not seconds > 0:
                    raise ValueError
            except ValueError:
                print(f"error: --rank_timeout: expected seconds > 0 ({value!r})", file=sys.stderr)
                raise SystemExit(2) from None
            return seconds, argv[:i] + argv[i + (1 if "=" in a else 2) :]
    return RANK_TIMEOUT_S, argv


def _report_line(failure, argv: list[str]) -> str:
    """The launcher's one line: the rank, what happened, the last complete checkpoint, the resume command."""
    from tagi_ds.train.checkpoint import newest_complete

    last = newest_complete(Path(failure.output_dir) / "checkpoints") if failure.output_dir else None
    command = ["python", "-m", "tagi_ds.launch", *argv]
    if "--resume_from_checkpoint" not in " ".join(argv):
        command += ["--resume_from_checkpoint", "latest"]
    where = (
        f"last complete checkpoint {last}; resume with: {' '.join(command)}"
        if last is not None
        else "no complete checkpoint yet: run the same command again"
    )
    return f"error: rank {failure.rank} (pid {failure.pid}) {failure.what}; stopped the other ranks; {where}"


if __name__ == "__main__":
    main()
