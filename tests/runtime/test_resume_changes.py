"""Resume with changed settings (issue 30): the fields that differ from the checkpoint's config are listed one line
each; an allowed change applies (a new train.lr reaches the optimizer and the scheduler that DeepSpeed restored);
a change the restored state cannot follow (batch shape, data source, seed) is refused in one line, exit 2, before
anything is written. Single-rank tiny runs, all in one process (``test_faults._run_all``)."""

import json

import pytest

from tagi_ds.config import from_dict
from tagi_ds.runtime.engine import lr_lambda
from tagi_ds.train import checkpoint, resume
from tests.runtime.test_faults import SMALL, _one_line, _run_all
from tests.train.harness import metrics

BASE = ["--max_steps", "6", *SMALL, "train.stop_after=4"]  # saves step-4 and stops; a resume runs steps 5-6


def _snapshot(out) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(once):
    """Run ``once`` per session, also across pytest-xdist workers."""

    def make(t):
        base, lr, shape, source, seed = t / "base", t / "lr", t / "shape", t / "source", t / "seed"
        corpus = t / "corpus.txt"
        corpus.write_text(" ".join(f"word{i % 97} text{i % 13}." for i in range(3000)) + "\n")
        latest = ["--resume_from_checkpoint", "latest"]
        steps = [("base", ["--output_dir", str(base), *BASE])]
        steps += [("!copy", ["copy", str(base), str(d)]) for d in (lr, shape, source, seed)]
        steps += [
            ("lr", ["--output_dir", str(lr), *latest, *BASE, "train.lr=0.1"]),
            ("shape", ["--output_dir", str(shape), *latest, *BASE, "data.tasks_per_batch=1"]),
            ("source", ["--output_dir", str(source), *latest, *BASE, f"data.corpus=text:{corpus}"]),
            ("seed", ["--output_dir", str(seed), "--seed", "7", *latest, *BASE]),
        ]
        return _run_all(steps)

    t, results = once("resume-changes", make)
    # Each copy as it was before its resume: the base run's files (the resumes wrote into the copies only).
    before = {name: _snapshot(t / "base") for name in ("shape", "source", "seed")}
    return t, results, before


def test_a_changed_lr_is_listed_and_reaches_the_optimizer_and_the_schedule(runs):
    t, r, _ = runs
    assert r["base"]["rc"] == 0, r["base"]["stderr"][-3000:]
    res = r["lr"]
    assert res["rc"] == 0, res["stderr"][-3000:]
    assert "Traceback" not in res["stderr"]
    notes = [ln for ln in res["stderr"].splitlines() if ln.startswith("note: resume changes")]
    assert notes == ["note: resume changes train.lr: 0.003 in the checkpoint, 0.1 now"], notes
    out = t / "lr"
    cfg = from_dict(json.loads((out / "config.json").read_text())["tagi"])
    assert cfg.train.lr == 0.1  # config.json describes what runs ...
    schedule = lr_lambda(cfg)
    logged = {m["step"]: m["lr"] for m in metrics(out)}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    old = {m["step"]: m["lr"] for m in metrics(t / "base")}
    assert all(logged[s] == old[s] for s in (1, 2, 3, 4))  # the first session's lines are kept
    # ... and runs: step s uses lr * lambda(s - 1) with the new peak (the restored scheduler would give 0.001 * ...)
    assert logged[5] == pytest.approx(0.1 * schedule(4), rel=1e-12)
    assert logged[6] == pytest.approx(0.1 * schedule(5), rel=1e-12)
    # the checkpoint the resume wrote records what ran: the next resume compares itself with lr 0.1
    finger = json.loads((out / "checkpoints" / "step-6" / checkpoint.FINGERPRINT).read_text())
    assert finger["config"]["train"]["lr"] == 0.1


@pytest.mark.parametrize(
    "name, field, values",
    [
        ("shape", "data.tasks_per_batch", "the checkpoint has 2, this run 1"),
        ("source", "data.corpus", 'the checkpoint has null, this run "text:'),
        ("seed", "train.seed", "the checkpoint has 42, this run 7"),
    ],
)
def test_a_change_the_restored_state_cannot_follow_is_refused_before_anything_is_written(runs, name, field, values):
    t, r, before = runs
    res = r[name]
    assert res["rc"] == 2, res["stderr"][-3000:]
    line = _one_line(
        res,
        f"error: --resume_from_checkpoint {t / name / 'checkpoints' / 'step-4'}: ",
        f"{field} cannot change on resume: ",
        values,
        "start a fresh run",
    )
    assert "resume changes" not in res["stderr"]  # refused: nothing listed as applied
    assert line.count("cannot change") == 1
    assert _snapshot(t / name) == before[name]  # config.json, metrics.jsonl, checkpoints: byte for byte


def test_an_older_checkpoint_is_compared_with_its_run_directorys_config_json(tmp_path):
    """A checkpoint whose fingerprint records no config (written before this check): OUTPUT_DIR/config.json."""
    step = tmp_path / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    (step / checkpoint.FINGERPRINT).write_text(json.dumps({"stage": "pretrain", "run_id": "x"}))
    tagi = from_dict({}).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({"tagi": tagi, "deepspeed": {"zero_optimization": {"stage": 3}}}))
    config, zero_stage, source = resume.saved_settings(step)
    assert (config, zero_stage, source) == (tagi, 3, str(tmp_path / "config.json"))
    (step / checkpoint.FINGERPRINT).write_text(json.dumps({"config": {"train": {"lr": 5}}, "zero_stage": 2}))
    assert resume.saved_settings(step)[:2] == ({"train": {"lr": 5}}, 2)  # the fingerprint's first


def test_which_fields_may_change_on_resume():
    for key in (
        "train.lr",
        "train.max_steps",
        "train.warmup_ratio",
        "train.weight_decay",
        "train.save_steps",
        "loss.kl_weight",
        "model.gradient_checkpointing",
    ):
        assert resume.why_fixed(key) is None, key
    for key in (
        "recipe",
        "mode",
        "model.d_model",
        "hypernet.rank",
        "teacher.rank",
        "data.spec",
        "data.corpus",
        "data.tasks_per_batch",
        "data.examples_per_task",
        "data.max_source_length",
        "train.seed",
        "train.grad_accum",
        "train.precision",
    ):
        assert resume.why_fixed(key), key
