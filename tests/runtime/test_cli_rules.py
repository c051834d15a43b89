"""One ``--set`` rule for every entry point that has the flag: several KEY=VALUE after one ``--set``, the flag
repeatable, all applied in order (launchers, ``python -m tagi_ds.data``, the benchmarks' common parser)."""

import argparse
import sys

from tagi_ds.cli import training_parser
from tagi_ds.data.__main__ import main as data_main
from tests.train.harness import REPO

ARGV = ["--set", "data.setting=def_pos", "data.num_pos=1", "--set", "data.max_instances_per_task=3"]
WANT = ["data.setting=def_pos", "data.num_pos=1", "data.max_instances_per_task=3"]


def test_launchers_and_benchmarks_parse_set_alike():
    assert training_parser("pretrain", "").parse_args(ARGV).overrides == WANT
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from common import add_recipe_args
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    p = argparse.ArgumentParser()
    add_recipe_args(p, "smoke")
    assert p.parse_args(ARGV).overrides == WANT


def test_data_cli_takes_several_keys_after_one_set(capsys):
    assert data_main(["--data", "builtin", "--split", "test", "--max-rows", "1", *ARGV]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "setting def_pos" in out and "test: 29 tasks, 87 instances" in out  # 3 instances per task
