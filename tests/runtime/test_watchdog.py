"""The launcher's watchdog judged poll by poll (``Watchdog.check``), on a real child process; the whole
launch path (a killed / stopped rank of a 2-rank job) is in tests/runtime/test_faults.py."""

import json
import os
import subprocess
import sys
import time

from tagi_ds.runtime.watchdog import OVERSLEEP_S, Watchdog


def _job_with_one_rank(tmp_path, beat_age_s: float):
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (tmp_path / "rank-1.json").write_text(json.dumps({"rank": 1, "pid": rank.pid, "host": "here"}))
    beat = tmp_path / "rank-1.beat"
    beat.touch()
    old = time.time() - beat_age_s
    os.utime(beat, (old, old))
    return rank


def test_a_stale_beat_is_a_frozen_rank_and_every_rank_is_killed(tmp_path):
    rank = _job_with_one_rank(tmp_path, beat_age_s=100)
    try:
        dog = Watchdog(tmp_path, rank_timeout_s=30)
        assert dog.check(1000.0) is True
        assert dog.failure.rank == 1 and dog.failure.what.startswith("stopped responding: no heartbeat for 100 s")
        assert rank.wait(timeout=60) == -9  # SIGKILLed
    finally:
        rank.kill()


def test_a_job_paused_as_a_whole_and_resumed_is_not_a_frozen_rank(tmp_path):
    """Ctrl-Z of the launch, then fg after more than --rank_timeout: every beat is old, but so is the watchdog's
    own last poll; the beats' age counts from its wake-up, and a rank that still does not beat is caught then."""
    rank = _job_with_one_rank(tmp_path, beat_age_s=0)
    try:
        dog = Watchdog(tmp_path, rank_timeout_s=30)
        assert dog.check(1000.0) is False
        old = time.time() - 100  # the job was stopped for 100 s: no beat meanwhile
        os.utime(tmp_path / "rank-1.beat", (old, old))
        assert dog.check(1000.0 + 100) is False  # woke 100 s late: a pause of the whole job
        assert dog.check(1000.0 + 100 + dog.poll) is False and dog.failure is None
        assert rank.poll() is None
        # still not beating 31 s after the wake-up: frozen after all
        dog._resumed_at -= 31
        assert dog.check(1000.0 + 100 + 2 * dog.poll) is True and "stopped responding" in dog.failure.what
        assert OVERSLEEP_S < 30  # a slow poll on a busy machine is far below any sane --rank_timeout
    finally:
        rank.kill()
