"""ZeRO-3 over 2 gloo CPU ranks through the deepspeed launcher: equivalence, resume, crashes, guards."""

import pytest
import torch
from safetensors.torch import load_file

from tests.train.harness import TINY, check, kill_session, launch, metrics, partitioned_z3, popen, wait_until

pytestmark = pytest.mark.distributed
FT = ["--set", "loss.kl_weight=0", "loss.param_weight=0"]  # finetune without teachers: CE only
# The 2-rank CE run both tests below compare against. No --deepspeed: the tiny recipe's default
# (ds_configs/z3_tiny.json, threshold 0) partitions the backbone.
STRAIGHT = ["--max_steps", "6", "--save_steps", "3", *TINY, "train.grad_accum=1", *FT]


@pytest.fixture(scope="module")
def straight(once) -> tuple:
    """One 2-rank ZeRO-3 run of 6 steps, shared (``once``: also across pytest-xdist workers): the 2-rank side of
    the 1-vs-2-rank comparison and the straight run the resumed one must repeat (one launch fewer than a run for
    each)."""

    def make(d):
        return check(launch("finetune.py", 2, ["--output_dir", str(d / "run"), *STRAIGHT])).stdout

    d, stdout = once("straight", make)
    return d / "run", stdout


def test_one_rank_and_two_ranks_give_the_same_losses(tmp_path, straight):
    two, stdout = straight
    one = tmp_path / "one"
    check(
        launch(
            "finetune.py",
            1,
            [
                "--deepspeed",
                partitioned_z3(tmp_path),
                "--output_dir",
                str(one),
                "--max_steps",
                "6",
                *TINY,
                "train.grad_accum=2",
                *FT,
            ],
        )
    )
    # The backbone really is partitioned, half on each rank, while the hypernetwork stays whole on every rank.
    assert (
        "ZeRO-3: 263,168 parameters partitioned across 2 rank(s), 131,584 held by each rank; 0 small ones kept whole"
    ) in stdout
    assert "hypernetwork 293,632 whole on every rank" in stdout
    # DeepSpeed's own line, once per rank at every start, is left out (tagi_ds.runtime.dist.init).
    assert "built successfully" not in stdout
    a, b = metrics(one), metrics(two)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x, y)
        assert abs(x["grad_norm"] - y["grad_norm"]) < 1e-4, (x, y)


def test_resume_in_a_new_process_is_identical_to_a_straight_run(tmp_path, straight):
    straight_out, _ = straight
    split = tmp_path / "split"
    first = check(launch("finetune.py", 2, ["--output_dir", str(split), *STRAIGHT, "train.stop_after=3"]))
    assert "train.stop_after=3: saved step 3" in first.stdout
    proc = check(
        launch("finetune.py", 2, ["--output_dir", str(split), "--resume_from_checkpoint", "latest", *STRAIGHT])
    )
    assert "resumed at step 3" in proc.stdout
    a, b = metrics(straight_out), metrics(split)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6), (x, y)
    wa = load_file(str(straight_out / "hypernet" / "generator.safetensors"))
    wb = load_file(str(split / "hypernet" / "generator.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def distilled(once) -> tuple:
    """Finetuning with teachers (KL + param-MSE), shared by the next two tests (issue 29: one teacher run and one
    1-rank / 2-rank pair instead of two of each; ``once``: also across pytest-xdist workers): 1 rank x accum 2
    measuring the gradient ratios at every step, 2 partitioned ZeRO-3 ranks x accum 1 measuring them at steps 0
    and 2 of 3 (train.grad_ratio_every=2)."""

    def make(tmp):
        ds = partitioned_z3(tmp)
        teachers = tmp / "teachers"
        check(
            launch(
                "train_teachers.py",
                1,
                ["--deepspeed", ds, "--output_dir", str(teachers), "--max_steps", "3", *TINY, "train.lr=1e-2"],
            )
        )
        # The absolute alignment term: the relative one (the default) leaves out tasks whose teacher row is still
        # zero, and 3 teacher steps train few of the tasks these 3 steps sample, so it would read 0 here.
        common = [
            "--deepspeed",
            ds,
            "--teachers",
            str(teachers / "teachers"),
            "--max_steps",
            "3",
            *TINY,
            "loss.param_align=delta",
        ]
        one, two = tmp / "one", tmp / "two"
        check(
            launch(
                "finetune.py", 1, ["--output_dir", str(one), *common, "train.grad_accum=2", "train.grad_ratio_every=1"]
            )
        )
        proc = check(
            launch(
                "finetune.py", 2, ["--output_dir", str(two), *common, "train.grad_accum=1", "train.grad_ratio_every=2"]
            )
        )
        return metrics(one), metrics(two), proc.stdout

    return once("distilled", make)[1]


def test_distillation_under_zero3_matches_one_rank_with_the_teacher_outside_zero(distilled):
    """2 partitioned ZeRO-3 ranks give the losses of 1 rank x accum 2, while the frozen teacher bank stays whole
    in host memory (never a DeepSpeed parameter)."""
    a, b, stdout = distilled
    assert "ZeRO-3: 263,168 parameters partitioned across 2 rank(s)" in stdout
    assert "in host memory, outside ZeRO" in stdout
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert x["kl"] > 0 and x["param"] > 0
        for key in ("loss", "ce", "kl", "param"):
            assert abs(x[key] - y[key]) < 1e-5, (key, x, y)


def test_grad_ratios_in_metrics_match_across_ranks_and_do_not_change_training(distilled):
    """train.grad_ratio_every: each term's gradient-norm ratio to CE's lands in metrics.jsonl, identical on 2 ZeRO-3
    ranks and on 1 rank x 2 micro-batches (the step's gradients: summed over micro-batches, averaged over ranks),
    and measuring leaves the training itself unchanged: the 1-rank run measured step 1 and the 2-rank run did
    not, and their losses (the test above) are the same."""
    a, b, _ = distilled
    keys = ("grad_ratio/kl", "grad_ratio/param", "grad_cos/kl", "grad_cos/param")
    assert all(k in m for m in a for k in keys)  # every step measured
    assert [all(k in m for k in keys) for m in b] == [True, False, True]  # steps 0 and 2 of 3
    for x, y in zip(a, b):
        for key in ("loss", "ce", "kl", "param"):
            assert abs(x[key] - y[key]) < 1e-5, (key, x, y)
        for key in keys:
            if key in y:
                assert abs(x[key] - y[key]) < 1e-4, (key, x, y)
    assert 0 < a[0]["grad_ratio/kl"] and 0 < a[0]["grad_ratio/param"]


def test_sigkill_resumes_from_last_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    ds = partitioned_z3(tmp_path)
    args = ["--deepspeed", ds, "--output_dir", str(out), "--save_steps", "2", *TINY, *FT]
    latest = out / "checkpoints" / "latest"
    with popen("finetune.py", 2, ["--max_steps", "400", *args]) as proc:
        wait_until(lambda: latest.exists() and latest.read_text().strip() != "step-2", proc, "a second checkpoint")
        kill_session(proc)  # the launcher and both ranks, mid-step or mid-save
        proc.wait()  # SIGKILL cannot be caught: no limit needed
    pointed = latest.read_text().strip()
    assert not pointed.endswith(".tmp") and (out / "checkpoints" / pointed / "trainer_rank1.pt").exists()
    # A half-written checkpoint (as a kill during a save leaves it) is never picked.
    (out / "checkpoints" / "step-999.tmp").mkdir()
    step = int(pointed.split("-")[1])
    res = check(launch("finetune.py", 2, ["--max_steps", str(step + 2), "--resume_from_checkpoint", "latest", *args]))
    assert f"resumed at step {step}" in res.stdout
    assert [m["step"] for m in metrics(out)][-2:] == [step + 1, step + 2]
    assert (out / "hypernet" / "generator.safetensors").exists()


def test_a_rank_that_raises_makes_the_launcher_fail_fast(tmp_path):
    # Rank 0 waits for rank 1 in its next collective. With the collective timeout an hour away, only the launcher
    # tearing the job down can end it before the hang guard (a wall-clock bound such as "under 90 s" cannot tell
    # the two apart: start-up plus the 60 s default timeout fits in it, and a loaded machine's start-up does not).
    proc = launch(
        "finetune.py",
        2,
        ["--output_dir", str(tmp_path / "r"), "--max_steps", "50", *TINY, *FT, "train.inject_fault=raise@2:1"],
        extra_env={"TAGI_COLLECTIVE_TIMEOUT_S": "3600"},
    )
    assert proc.returncode != 0
    assert "injected fault at step 2 on rank 1" in proc.stdout + proc.stderr


def test_nan_loss_on_one_rank_is_skipped_on_both(tmp_path):
    out = tmp_path / "nan"
    proc = check(
        launch(
            "finetune.py", 2, ["--output_dir", str(out), "--max_steps", "4", *TINY, *FT, "train.inject_fault=nan@1:1"]
        )
    )
    log = proc.stdout
    assert "[rank 0] non-finite loss at step 2 (here: False)" in log
    assert "[rank 1] non-finite loss at step 2 (here: True)" in log
    m = metrics(out)
    assert [r["skipped_steps"] for r in m] == [0, 1, 1, 1]
    assert all(r["loss"] == r["loss"] for r in m if r["step"] != 2)  # finite elsewhere
