"""A loss term added through the registry alone, as docs/architecture.md ("A loss term") says to add one.

Two throwaway terms are defined and registered here, in this test file only; no file of the package changes:
``entropy``, a token term (the mean entropy of the student's next-token distribution, computed a chunk at a time
inside the LM-head loop), and ``gen_l2``, an adapter term (the squared norm of the batch's student adapter
factors). Each has a constant weight and a planner ``Cost``. The tests see them enter the loss, the terms dict,
metrics.jsonl and ``grad_ratio/*`` of a 2-rank ZeRO-3 run, and the planner's FLOPs and memory; with weight 0
they are off (the loss and the plan are those without them).

How a registration inside a test reaches the rank processes: the test writes a runner script that calls
:func:`register` and then ``tagi_ds.cli.train_main`` (what ``launchers/finetune.py`` runs), and launches it with
``python -m tagi_ds.launch`` like any launcher; every rank imports this module and registers the same records
before it builds its model (the family test does the same through ``tests/backbones/pipeline.py --register``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from tagi_ds import loss_terms, plan
from tagi_ds.loss_terms import Cost, LossTerm
from tagi_ds.plan import PlanInput
from tests.train.harness import REPO, TINY, check, env, metrics, run_job

ENTROPY_WEIGHT, L2_WEIGHT = 0.05, 1e-3


def _entropy(student, labels, teacher, lc):
    """Summed entropy of softmax(student) over the chunk's rows (the loop divides by the N target tokens)."""
    log_p = torch.log_softmax(student, dim=-1)
    return -(log_p.exp() * log_p).sum()


def _gen_l2(student, teacher, lc):
    return sum((a.float() ** 2).sum() + (b.float() ** 2).sum() for a, b in student.factors.values())


ENTROPY = LossTerm(
    "entropy",
    ENTROPY_WEIGHT,
    "token",
    _entropy,
    # a softmax and a product over V per target token, forward and backward; two fp32 [chunk, V] temporaries
    cost=Cost(chunk=((2, 2), (2, 2)), flops=lambda c, s: 3 * 4 * s.micro_batch * s.target_len * c.vocab),
)
GEN_L2 = LossTerm(
    "gen_l2",
    L2_WEIGHT,
    "adapter",
    _gen_l2,
    cost=Cost(
        flops=lambda c, s: 3 * 2 * sum(s.tasks * c.rank * (di + do) for *_, di, do in c.sites),
        saved=lambda c, s, b: sum(s.tasks * c.rank * (di + do) * b for *_, di, do in c.sites),
    ),
)


def register() -> None:
    """What each rank runs first (the runner script below)."""
    loss_terms.register(ENTROPY)
    loss_terms.register(GEN_L2)


@pytest.fixture
def both():
    with loss_terms.registered(ENTROPY), loss_terms.registered(GEN_L2):
        yield


def _step(cfg_overrides=()):
    """``(loss, terms, ce reference pieces)`` of one finetune forward of tiny T5 in mode tagi, no teacher."""
    from tagi_ds.config import apply_overrides
    from tagi_ds.model import build_backbone, build_model
    from tagi_ds.recipes import get_recipe

    cfg = apply_overrides(get_recipe("tiny"), ["loss.kl_weight=0", "loss.param_weight=0", "loss.chunk_tokens=5"])
    p, _ = plan.resolve(PlanInput(model="tiny", nodes=1, gpus_per_node=1, stage="none", teacher_rows=0))
    torch.manual_seed(0)
    model = build_model(cfg, "finetune", build_backbone(cfg))
    batch = plan.synthetic_batch(cfg.model.arch, plan.shapes_of(p), cfg.model.vocab_size, teacher=False, seed=0)
    loss, terms = model(batch)
    adapters, states = model.student_adapters(batch)
    x, labels, head = model.head_rows(batch.input_ids, batch.attention_mask, batch.labels, adapters, batch, states)
    return loss, terms, head(x).float(), adapters


def test_a_registered_term_enters_the_loss_and_its_terms_and_weight_zero_turns_it_off(both):
    loss, terms, logits, adapters = _step()
    assert list(terms) == ["ce", "entropy", "gen_l2"]  # registry order; KL and alignment are off without teacher
    log_p = torch.log_softmax(logits, -1)
    torch.testing.assert_close(terms["entropy"], -(log_p.exp() * log_p).sum(-1).mean())  # chunked = whole
    torch.testing.assert_close(terms["gen_l2"], _gen_l2(adapters, None, None))
    torch.testing.assert_close(loss, terms["ce"] + ENTROPY_WEIGHT * terms["entropy"] + L2_WEIGHT * terms["gen_l2"])
    with_terms_ce = terms["ce"]
    loss_terms.TERMS["entropy"] = dataclasses.replace(ENTROPY, weight=0.0)
    loss_terms.TERMS["gen_l2"] = dataclasses.replace(GEN_L2, weight=0.0)
    off_loss, off_terms, _, _ = _step()
    assert list(off_terms) == ["ce"]
    torch.testing.assert_close(off_loss, with_terms_ce)
    for name in ("entropy", "gen_l2"):
        del loss_terms.TERMS[name]
    bare_loss, _, _, _ = _step()
    assert torch.equal(off_loss, bare_loss)  # off: the loss is the one without the terms, to the bit


def _plan():
    return plan.plan(PlanInput(model="tiny", nodes=1, gpus_per_node=1, stage="none"))


def test_the_planner_counts_a_registered_term_and_not_one_of_weight_zero():
    bare = _plan()
    with loss_terms.registered(ENTROPY), loss_terms.registered(GEN_L2):
        got = _plan()
    p, cfg = plan.resolve(PlanInput(model="tiny", nodes=1, gpus_per_node=1, stage="none"))
    c, s = plan.count(cfg, p.teacher_rows), plan.shapes_of(p)
    assert got["input"]["terms"] == ("ce", "kl", "param", "entropy", "gen_l2")
    entropy, l2 = got["loss_terms"]["entropy"], got["loss_terms"]["gen_l2"]
    assert (entropy["weight"], entropy["kind"], l2["kind"]) == (ENTROPY_WEIGHT, "token", "adapter")
    assert entropy["flops"] == 3 * 4 * s.micro_batch * s.target_len * c.vocab > 0
    # FLOPs: the step's hardware FLOPs grow by exactly the two terms' own
    assert got["time"]["hardware_flops"] == bare["time"]["hardware_flops"] + entropy["flops"] + l2["flops"]
    # memory: the loss chunk holds two more fp32 [chunk, V] in forward and backward; gen_l2 saves the factors
    b = 4  # the tiny recipe trains in fp32
    unit = min(c.chunk, s.micro_batch * s.target_len) * c.vocab * 4
    assert entropy["chunk_forward_bytes"] == entropy["chunk_backward_bytes"] == 2 * unit
    assert got["activations"]["loss_chunk"] == bare["activations"]["loss_chunk"] + 2 * unit
    assert l2["saved_bytes"] == sum(s.tasks * c.rank * (di + do) * b for *_, di, do in c.sites) > 0
    assert got["activations"]["saved"] == bare["activations"]["saved"] + l2["saved_bytes"]
    assert got["memory"]["total"] > bare["memory"]["total"]
    # weight 0: not counted, the plan is the one without the terms
    off = (dataclasses.replace(ENTROPY, weight=0.0), dataclasses.replace(GEN_L2, weight=0))
    with loss_terms.registered(off[0]), loss_terms.registered(off[1]):
        zero = _plan()
    assert zero == bare


RUNNER = """import sys
sys.path.insert(0, {repo!r})
from tests.train.test_loss_term import register
register()
from tagi_ds.cli import guarded, train_main
guarded(lambda: train_main("finetune", "finetune with the test's loss terms"))
"""


@pytest.mark.distributed
def test_a_registered_term_reaches_every_rank_the_log_and_grad_ratio(tmp_path: Path):
    """2 ZeRO-3 ranks (the tiny recipe's z3_tiny.json partitions the backbone), 2 steps, CE + the two terms."""
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER.format(repo=str(REPO)))
    out = tmp_path / "run"
    args = ["--output_dir", str(out), "--max_steps", "2", *TINY, "train.grad_ratio_every=1"]
    args += ["loss.kl_weight=0", "loss.param_weight=0"]
    cmd = [sys.executable, "-m", "tagi_ds.launch", "--num_gpus", "2", str(runner), *args]
    check(run_job(cmd, env_=env()))
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert m["entropy"] > 0 and m["gen_l2"] > 0
        assert math.isclose(
            m["loss"], m["ce"] + ENTROPY_WEIGHT * m["entropy"] + L2_WEIGHT * m["gen_l2"], rel_tol=1e-5
        ), m
        assert m["grad_ratio/entropy"] > 0 and m["grad_ratio/gen_l2"] > 0, m
        assert "kl" not in m and "param" not in m


def test_architecture_md_says_to_add_a_term_as_this_test_does():
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text[text.index("- **A loss term**") :].split("\n- **", 1)[0]
    for step in ("loss_terms.register", "LossTerm", "Cost", "token", "adapter", "tests/train/test_loss_term.py"):
        assert step in section, step


def test_the_registry_imports_no_torch():
    """stages.spec asks the registry whether a run distils: the config layer stays torch-free."""
    code = "import sys, tagi_ds.loss_terms, tagi_ds.stages; assert 'torch' not in sys.modules, 'torch imported'"
    check(run_job([sys.executable, "-c", code], env_=env()))


@pytest.mark.parametrize(
    "term, message",
    [
        (dataclasses.replace(ENTROPY, name="ce"), "'ce' is registered already"),
        (dataclasses.replace(ENTROPY, weight="entropy_weight"), "LossConfig has no weight field 'entropy_weight'"),
        (dataclasses.replace(ENTROPY, weight=-1.0), "a constant weight must be >= 0, got -1.0"),
        (dataclasses.replace(GEN_L2, teacher_view=True), "only a token term reads the teacher view's logits"),
        (dataclasses.replace(GEN_L2, kind="site"), "kind must be token or adapter, got 'site'"),
    ],
)
def test_a_bad_record_is_refused_naming_the_term(term, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        loss_terms.register(term)
    assert list(loss_terms.TERMS) == ["ce", "kl", "param"]
