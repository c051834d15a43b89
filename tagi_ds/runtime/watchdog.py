"""A dead or frozen rank reported as what it is: which rank, its signal or exit code, where to resume.

Without this, a rank that dies (SIGKILL, the OOM killer, a segfault) shows up as the *other* ranks' gloo/NCCL
tracebacks ("Connection closed by peer"), and a rank that freezes (SIGSTOP, a hang in a driver) as a
collective timeout minutes later, with nothing naming the rank or the checkpoint to go on from.

Two halves, joined by a job directory (``$TAGI_JOB_DIR``, made by ``python -m tagi_ds.launch``):

- every rank (:func:`start_beating`, from ``dist.init``) writes ``rank-R.json`` (its pid, later its run dir) and
  touches ``rank-R.beat`` once a second from a thread. A rank ending through Python, however it ends, leaves
  ``rank-R.end`` (:func:`record_end`); a rank that loses a peer mid-collective ends quietly with
  ``EXIT_PEER_LOST`` (:func:`is_peer_loss`), since the launcher names the rank at fault;
- the launcher's :class:`Watchdog` thread polls those files: a rank whose process is gone without an
  ``.end`` died; a rank whose beat is older than ``--rank_timeout`` is frozen (a stopped process's threads
  stop too; a rank waiting in a collective for a dead peer still beats). Either way it kills every rank of the
  job and, once the DeepSpeed launcher has returned, prints the one line and exits ``EXIT_RANK_LOST``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tagi_ds.files import atomic_write

JOB_ENV = "TAGI_JOB_DIR"
BEAT_S = 1.0
OVERSLEEP_S = 5.0  # a poll this late means the launcher was stopped too (not just a slow machine)
RANK_TIMEOUT_S = 30.0  # a frozen rank is killed after this; + the launcher's teardown, well under 60 s end to end
EXIT_PEER_LOST = 5  # this rank lost a peer mid-collective; the launcher reports the peer (README: exit codes)
EXIT_RANK_LOST = 6  # the launcher: a rank died or froze; the job was stopped

# What torch.distributed's gloo / NCCL errors say when the other end is gone (a peer died, or the collective
# timed out waiting for a frozen one).
_PEER_LOSS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Timed out waiting",
    "Socket Timeout",
    "timed out after",
    "NCCL communicator was aborted",
    "Connection refused",
)


def job_dir() -> Path | None:
    value = os.environ.get(JOB_ENV)
    return Path(value) if value else None


# -- the rank side --------------------------------------------------------------------------------------------
_rank: int | None = None


def start_beating(rank: int) -> None:
    """Register this rank with the launcher's watchdog and beat once a second (no-op outside tagi_ds.launch)."""
    global _rank
    job = job_dir()
    if job is None or _rank is not None or not job.is_dir():
        return
    _rank = rank
    _write(job / f"rank-{rank}.json", {"rank": rank, "pid": os.getpid(), "host": socket.gethostname()})
    # Any exit through the interpreter (the end of a script, sys.exit, an uncaught exception) says so; only a
    # signal, os._exit or a crash leave no .end: that is what "died" means to the watchdog.
    atexit.register(lambda: (job / f"rank-{rank}.end").exists() or record_end(-1))
    beat = job / f"rank-{rank}.beat"

    def loop() -> None:
        while True:
            with contextlib.suppress(OSError):
                beat.touch()
            time.sleep(BEAT_S)

    threading.Thread(target=loop, name="tagi-heartbeat", daemon=True).start()


def note_run_dir(out: Path) -> None:
    """The run directory, for the launcher's line (its last complete checkpoint)."""
    job = job_dir()
    if job is None or _rank is None:
        return
    path = job / f"rank-{_rank}.json"
    with contextlib.suppress(OSError, ValueError):
        _write(path, {**json.loads(path.read_text()), "output_dir": str(Path(out).absolute())})


def record_end(code: int, peer_lost: str | None = None) -> None:
    """This rank is ending through Python with ``code`` (so it did not die): the watchdog leaves it alone."""
    job = job_dir()
    if job is not None and _rank is not None:
        with contextlib.suppress(OSError):
            _write(job / f"rank-{_rank}.end", {"code": code, "peer_lost": peer_lost})


def is_peer_loss(err: BaseException) -> bool:
    """A torch.distributed error that means a peer is gone (under tagi_ds.launch, which then names it)."""
    import torch.distributed as tdist

    text = str(err)
    dist_error = isinstance(err, getattr(tdist, "DistError", ())) or "gloo" in text or "NCCL" in text
    return job_dir() is not None and dist_error and any(s in text for s in _PEER_LOSS)


def _write(path: Path, obj: dict) -> None:
    atomic_write(path, json.dumps(obj))  # the launcher side never reads half a record


# -- the launcher side ----------------------------------------------------------------------------------------
@dataclass
class Failure:
    rank: int
    pid: int
    what: str  # "was killed by SIGKILL", "exited with code 3 without a report", "stopped responding ..."
    output_dir: str | None


class Watchdog:
    """Polls the job directory from a thread; see the module docstring."""

    # Polled every 50 ms: a dead rank is a zombie only until the DeepSpeed launcher's next poll (1 s), and its
    # exit status (the signal) can only be read from /proc meanwhile. A poll reads a few small files.
    def __init__(self, job: Path, rank_timeout_s: float = RANK_TIMEOUT_S, poll_s: float = 0.05) -> None:
        self.job, self.timeout, self.poll = job, rank_timeout_s, poll_s
        self.failure: Failure | None = None
        self._clean: set[int] = set()
        self._codes: dict[int, int] = {}  # pid -> exit status read from /proc while it was a zombie
        self._last_wake: float | None = None  # time.monotonic() of the previous poll
        self._resumed_at = 0.0  # time.time() the watchdog last woke from a pause of the whole job (Ctrl-Z, fg)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tagi-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def ranks(self) -> list[dict]:
        found = []
        for path in sorted(self.job.glob("rank-*.json")):
            with contextlib.suppress(OSError, ValueError):
                found.append(json.loads(path.read_text()))
        return found

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            if self.check(time.monotonic()):
                return

    def check(self, now: float) -> bool:
        """One poll at monotonic time ``now``; True when it found a failure (and killed every rank)."""
        if self._last_wake is not None and now - self._last_wake > self.poll + OVERSLEEP_S:
            # The watchdog itself did not run for a while: the whole job was stopped (Ctrl-Z then fg, a suspended
            # VM). Every rank's beats stopped with it, so a beat's age counts from this wake-up, not from before.
            self._resumed_at = time.time()
        self._last_wake = now
        ranks = self.ranks()
        for r in ranks:
            if (self.job / f"rank-{r['rank']}.end").exists() or r["pid"] in self._clean:
                continue
            what = self._dead(r["pid"]) or self._frozen(r["rank"])
            if what:
                self.failure = Failure(r["rank"], r["pid"], what, _output_dir(ranks))
                self._kill_all(ranks)
                return True
        return False

    def _dead(self, pid: int) -> str | None:
        status = _zombie_status(pid)
        if status is not None:
            self._codes[pid] = status
        if status is None and _alive(pid):
            return None
        code = self._codes.get(pid)
        if code is None:
            # The DeepSpeed launcher (its parent) reaped it before a look at /proc caught the zombie: polled every
            # 50 ms against the launcher's 1 s, that is rare.
            return "died without a report (a signal or a crash; its exit status was reaped before it could be read)"
        if os.WIFEXITED(code) and os.WEXITSTATUS(code) == 0:
            self._clean.add(pid)  # ended normally after all (a process outside tagi-ds's entry points)
            return None
        if os.WIFSIGNALED(code):
            sig = os.WTERMSIG(code)
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            hint = " (the OOM killer sends it too)" if sig == signal.SIGKILL else ""
            return f"was killed by {name}{hint}"
        return f"exited with code {os.WEXITSTATUS(code)} without a report"

    def _frozen(self, rank: int) -> str | None:
        beat = self.job / f"rank-{rank}.beat"
        try:
            age = time.time() - max(beat.stat().st_mtime, self._resumed_at)
        except OSError:
            return None  # not beating yet (still importing): the DeepSpeed launcher's own wait covers it
        if age <= self.timeout:
            return None
        return (
            f"stopped responding: no heartbeat for {age:.0f} s (--rank_timeout {self.timeout:g}; "
            "a stopped process (SIGSTOP, a debugger), a hang, or a swapping machine)"
        )

    def _kill_all(self, ranks: list[dict]) -> None:
        # SIGKILL, not SIGTERM: a frozen rank cannot act on SIGTERM, and a survivor blocked in a collective would
        # try to save first (train/guards.py) and wait there; the last complete checkpoint is what resumes.
        for r in ranks:
            with contextlib.suppress(OSError):
                os.kill(r["pid"], signal.SIGKILL)


def _output_dir(ranks: list[dict]) -> str | None:
    return next((r["output_dir"] for r in ranks if r.get("output_dir")), None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _zombie_status(pid) is None


def _zombie_status(pid: int) -> int | None:
    """The wait status of ``pid`` while it is a zombie (not yet reaped by its parent, the DeepSpeed launcher, which
    polls once a second): field 52 of /proc/PID/stat (Linux >= 3.5); None if it is running or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] != "Z" or len(fields) < 50:
        return None
    return int(fields[49])
