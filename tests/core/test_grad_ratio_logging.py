"""train.grad_ratio_every: each term's gradient-norm ratio to CE's lands in metrics.jsonl, identical on 2 ZeRO-3
ranks and on 1 rank x 2 micro-batches (the step's gradients: summed over micro-batches, averaged over ranks),
and measuring leaves the training itself unchanged."""

import pytest

from tests.train.harness import TINY, check, launch, metrics, partitioned_z3

pytestmark = pytest.mark.distributed


def test_grad_ratios_in_metrics_match_across_ranks_and_do_not_change_training(tmp_path):
    ds = partitioned_z3(tmp_path)
    teachers = tmp_path / "teachers"
    check(launch("train_teachers.py", 1, ["--deepspeed", ds, "--output_dir", str(teachers), "--max_steps", "3",
                                          *TINY, "train.lr=1e-2"]))
    common = ["--deepspeed", ds, "--teachers", str(teachers / "teachers"), "--max_steps", "3", *TINY]
    one, two = tmp_path / "one", tmp_path / "two"
    check(launch("finetune.py", 1, ["--output_dir", str(one), *common, "train.grad_accum=2",
                                    "train.grad_ratio_every=1"]))
    check(launch("finetune.py", 2, ["--output_dir", str(two), *common, "train.grad_accum=1",
                                    "train.grad_ratio_every=2"]))
    a, b = metrics(one), metrics(two)
    keys = ("grad_ratio/kl", "grad_ratio/param", "grad_cos/kl", "grad_cos/param")
    assert all(k in m for m in a for k in keys)  # every step measured
    assert [all(k in m for k in keys) for m in b] == [True, False, True]  # steps 0 and 2 of 3
    for x, y in zip(a, b):
        # One rank measured step 1 and the other did not: the same losses say measuring changed nothing.
        for key in ("loss", "ce", "kl", "param"):
            assert abs(x[key] - y[key]) < 1e-5, (key, x, y)
        for key in keys:
            if key in y:
                assert abs(x[key] - y[key]) < 1e-4, (key, x, y)
    assert 0 < a[0]["grad_ratio/kl"] and 0 < a[0]["grad_ratio/param"]
