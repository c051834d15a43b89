"""Guards: non-finite steps, consecutive-failure stop, and stop-and-save on a signal or a lost launcher.

Every decision is taken by all ranks together (``dist.any_rank``), so no rank skips a collective
that another rank enters.

Stop requests: SIGUSR1, SIGTERM or SIGINT (Ctrl-C) to a rank, or the loss of the DeepSpeed launcher above it. The
``deepspeed`` runner has no signal handler of its own (local runs): SIGTERM or SIGUSR1 sent to its PID alone
kills it and would leave the ranks training on, orphaned. So each rank watches the runner and
``deepspeed.launcher.launch`` above it; when one of them is gone, that counts as a stop request: the ranks
finish the step, save, and exit 0, with no launcher left to cut the save short.
"""

from __future__ import annotations

import errno
import math
import os
import re
import signal
import threading

import torch

from tagi_ds.runtime import dist
from tagi_ds.runtime.preflight import EXIT_BAD_STEPS, Stopped

WATCH_INTERVAL_S = 1.0


class TooManyBadSteps(Stopped):
    exit_code = EXIT_BAD_STEPS


class Guards:
    def __init__(self, max_bad_steps: int, inject_fault: str = "", watch_launcher: bool = True) -> None:
        self.max_bad = max_bad_steps
        self.skipped = 0
        self.in_a_row = 0
        self.first_bad_step = 0
        self.reason: str | None = None  # why a stop was requested (a signal, the launcher gone)
        self.fault = _parse_fault(inject_fault)
        # enospc@STEP / rofs@STEP: the checkpoint of that step fails to write (checkpoint.save); step 0 is
        # config.json's write (rundir.write_config)
        self.save_fault = None
        if self.fault and self.fault[0] in ("enospc", "rofs"):
            self.save_fault = (self.fault[1], errno.ENOSPC if self.fault[0] == "enospc" else errno.EROFS)
            self.fault = None
        # SIGINT too: Ctrl-C reaches every process of the job (the terminal's process group) and used to end each
        # rank with a KeyboardInterrupt traceback and nothing saved.
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self._watched = _launcher_processes() if watch_launcher else []
        if self._watched:
            threading.Thread(target=self._watch, name="tagi-launcher-watch", daemon=True).start()

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self.reason = self.reason or f"{signal.Signals(signum).name} received"

    def _watch(self) -> None:
        stop = threading.Event()
        while not stop.wait(WATCH_INTERVAL_S):
            if self._launcher_gone():
                return

    def _launcher_gone(self) -> bool:
        import psutil

        for proc, what in self._watched:
            try:
                gone = not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
            except psutil.Error:
                gone = True
            if gone:
                self.reason = self.reason or f"the {what} (pid {proc.pid}) exited"
                return True
        return False

    def inject(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if self.fault and self.fault[1] <= step <= self.fault[2] and self.fault[3] == dist.rank():
            if self.fault[0] == "raise":
                raise RuntimeError(f"injected fault at step {step} on rank {dist.rank()} (train.inject_fault)")
            if self.fault[0] in ("kill", "stop"):  # a rank that dies / freezes (runtime/watchdog.py reports it)
                os.kill(os.getpid(), signal.SIGKILL if self.fault[0] == "kill" else signal.SIGSTOP)
            return loss * float("nan")
        return loss

    def loss_is_bad(self, loss: torch.Tensor, step: int) -> bool:
        mine = not bool(torch.isfinite(loss.detach()).all())
        bad = dist.any_rank(mine)
        if bad:  # every rank says so: the log shows that all ranks skipped the same step
            print(
                f"[rank {dist.rank()}] non-finite loss at step {step + 1} (here: {mine}): step skipped on all ranks",
                flush=True,
            )
        return bad

    def record(self, bad: bool, step: int) -> None:
        """Count step ``step`` (1-based) as good or bad; see :meth:`too_many_bad`."""
        if not bad:
            self.in_a_row = 0
            return
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row == 1:
            self.first_bad_step = step

    def too_many_bad(self) -> bool:
        """``train.max_bad_steps`` bad steps in a row: the run stops (the same answer on every rank)."""
        return self.in_a_row >= self.max_bad

    def bad_steps_message(self, step: int, saved: str) -> str:
        return (
            f"stopped: train.max_bad_steps={self.max_bad}: {self.in_a_row} non-finite steps in a row "
            f"(steps {self.first_bad_step}-{step}); saved {saved}; resume with --resume_from_checkpoint latest "
            "(e.g. with a lower train.lr)"
        )

    @staticmethod
    def grad_norm_is_bad(norm) -> bool:
        return norm is not None and not math.isfinite(float(norm))

    def stop_requested(self) -> bool:
        if not dist.any_rank(self.reason is not None):
            return False
        # Another rank saw it first: each rank's watch polls on its own clock, so on a loaded machine rank 0 (which
        # says why the run stopped) may not have looked yet. A lost launcher is lost for every rank: look now.
        if self.reason is None and self._watched:
            self._launcher_gone()
        self.reason = self.reason or "a stop requested on another rank"
        return True


def _launcher_processes() -> list:
    """``[(psutil.Process, what)]``: the DeepSpeed launcher processes above this one (launch.py, the runner)."""
    try:
        import psutil

        found, proc = [], psutil.Process(os.getpid()).parent()
        while proc is not None and proc.pid > 1:
            cmd = " ".join(proc.cmdline())
            if "deepspeed.launcher.launch" in cmd:
                found.append((proc, "deepspeed launcher (deepspeed.launcher.launch)"))
            elif re.search(r"(^|[/\s])deepspeed(\s|$)|deepspeed\.launcher\.runner|tagi_ds\.launch(\s|$)", cmd):
                found.append((proc, "deepspeed runner"))
            else:
                break
            proc = proc.parent()
        return found
    except Exception:  # noqa: BLE001  (no psutil, no /proc: run without the watch, as before)
        return []


def _parse_fault(spec: str):
    """``nan@STEP[-LAST]:RANK`` (a NaN loss at those 0-based steps), ``raise|kill|stop@STEP:RANK`` or
    ``enospc|rofs@STEP``;
    validated by the config's rule for train.inject_fault."""
    if not spec:
        return None
    if m := re.fullmatch(r"(enospc|rofs)@(\d+)", spec):
        return m[1], int(m[2]), int(m[2]), None
    m = re.fullmatch(r"(nan|raise|kill|stop)@(\d+)(?:-(\d+))?:(\d+)", spec)
    if m is None:
        raise ValueError(
            f"train.inject_fault: expected nan@STEP[-LAST]:RANK, raise|kill|stop@STEP:RANK or "
            f"enospc|rofs@STEP ({spec!r})"
        )
    first = int(m[2])
    return m[1], first, int(m[3]) if m[3] else first, int(m[4])
