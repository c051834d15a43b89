"""``python -m tagi_ds.launch [deepspeed options] launchers/STAGE.py [flags]``: the deepspeed launcher, on a free port.

The plain ``deepspeed`` launcher rendezvouses on port 29500 unless told otherwise, so a second job on the same
machine (the test suite, another experiment) dies with EADDRINUSE, sometimes minutes in. This wrapper passes
every option through to DeepSpeed's own runner and adds:

- ``--master_port``: the one given, else ``$MASTER_PORT``, else a port the OS reports free; printed either way;
- ``--log_level error`` for the runner unless given (its INFO lines repeat the command and the world layout);
- ``DS_ACCELERATOR=cpu`` on a machine without CUDA (otherwise every process warns that it fell back to CPU);
- ``TORCH_EXTENSIONS_DIR`` per Python environment unless set (:func:`use_own_extensions_dir`).

Usage is the deepspeed launcher's: ``python -m tagi_ds.launch --num_gpus 2 launchers/pretrain.py --max_steps 5``.
"""

from __future__ import annotations

import os
import signal
import sys

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
        extra += ["--log_level", "error"]
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
    full, source = runner_argv(argv, dict(os.environ))
    how = {"free": "a free port; set MASTER_PORT or --master_port to choose",
           "MASTER_PORT": "from MASTER_PORT", "--master_port": "from --master_port"}[source]
    print(f"tagi-ds launch: rendezvous on port {port_of(full)} ({how})", flush=True)
    from deepspeed.launcher.runner import main as ds_main

    # Ctrl-C reaches every process of the job: the ranks save and stop (train/guards.py), DeepSpeed's launch.py
    # passes a SIGTERM on and waits for them. The runner here has no handler on one node and died with a
    # KeyboardInterrupt traceback before the ranks had saved; ignoring it lets the runner wait for them.
    # (A SIGINT handler, not SIG_IGN: an ignored signal would stay ignored in the processes it starts.)
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    ds_main(full)


if __name__ == "__main__":
    main()
