"""python -m tagi_ds.launch: jobs never collide on a rendezvous port (a free one unless the user gives one), and
each Python environment compiles DeepSpeed's ops into its own folder."""

from __future__ import annotations

import re

import pytest

from tagi_ds.launch import runner_argv
from tests.train.harness import HANG_S, TINY, metrics, popen

SCRIPT = ["--num_gpus", "2", "launchers/pretrain.py", "--master_port", "7"]  # the script's own flag stays its own


def test_a_given_port_wins_then_master_port_then_a_free_one():
    argv, source = runner_argv(["--master_port", "1234", *SCRIPT], {"MASTER_PORT": "999"})
    assert source == "--master_port" and argv.count("--master_port") == 2 and "999" not in argv
    argv, source = runner_argv(["--master_port=1234", *SCRIPT], {})
    assert source == "--master_port" and argv[:2] == ["--log_level", "critical"]
    argv, source = runner_argv(SCRIPT, {"MASTER_PORT": "29555"})
    assert source == "MASTER_PORT" and argv[:2] == ["--master_port", "29555"] and argv[-len(SCRIPT) :] == SCRIPT
    argv, source = runner_argv(SCRIPT, {"MASTER_PORT": ""})
    assert source == "free" and argv[0] == "--master_port" and 0 < int(argv[1]) < 65536 and argv[1] != "29500"


def test_the_runner_log_level_is_quiet_unless_asked():
    assert runner_argv(["--log_level", "info", *SCRIPT], {})[0].count("--log_level") == 1
    assert "--log_level" not in runner_argv(["--quiet", *SCRIPT], {})[0]


@pytest.mark.distributed
def test_two_runs_started_at_once_without_ports_both_finish(tmp_path):
    """The quickstart's failure mode (EADDRINUSE on 29500 when another DeepSpeed job runs), reproduced with two
    real jobs started together, neither given a port. One rank each: rank 0 binds the rendezvous port whatever the
    world size, so two ranks per job would only double the processes on the CPU (the suite runs a dozen 2-rank
    jobs)."""
    outs = [tmp_path / "a", tmp_path / "b"]
    procs = [popen("pretrain.py", 1, ["--max_steps", "2", "--output_dir", str(o), *TINY]) for o in outs]
    with procs[0], procs[1]:
        logs = [p.communicate(timeout=HANG_S)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    ports = [re.search(r"rendezvous on port (\d+) \(a free port", log).group(1) for log in logs]
    assert ports[0] != ports[1]
    assert all(metrics(o)[-1]["step"] == 2 for o in outs)
    assert not any("Setting accelerator to CPU" in log for log in logs)  # DS_ACCELERATOR=cpu set by the wrapper


def test_each_python_environment_compiles_deepspeed_ops_into_its_own_folder(monkeypatch):
    import sys

    from tagi_ds.launch import use_own_extensions_dir

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")
    assert use_own_extensions_dir() == "/somewhere/else"  # a folder the user chose wins
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    mine = use_own_extensions_dir()
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "prefix", sys.prefix + "-other-venv")
    assert use_own_extensions_dir() != mine and "torch_extensions" in mine


def test_rank_timeout_is_the_launchers_own_option_and_a_bad_value_is_one_line(capsys):
    from tagi_ds.launch import _rank_timeout

    assert _rank_timeout(["--rank_timeout", "12", *SCRIPT]) == (12.0, SCRIPT)
    assert _rank_timeout(["--rank_timeout=7.5", *SCRIPT]) == (7.5, SCRIPT)
    assert _rank_timeout(SCRIPT)[1] == SCRIPT
    for bad in ("0", "soon"):
        with pytest.raises(SystemExit) as exit_:
            _rank_timeout(["--rank_timeout", bad, *SCRIPT])
        assert exit_.value.code == 2
        assert capsys.readouterr().err == f"error: --rank_timeout: expected seconds > 0 ({bad!r})\n"
