"""The one run assembly (tagi_ds/assembly.py) and the config frozen after preflight."""

import copy
import dataclasses
import pickle

import pytest
import torch

from tagi_ds import artifacts, assembly, stages
from tagi_ds.config import frozen
from tagi_ds.eval import evaluate
from tagi_ds.model import build_backbone, build_model
from tagi_ds.recipes import get_recipe
from tagi_ds.runtime import engine as E
from tagi_ds.train import loop


# -- the frozen config ---------------------------------------------------------------------------------------
def test_a_frozen_config_refuses_every_assignment_and_replace_makes_a_new_one():
    cfg = get_recipe("tiny")
    f = frozen(cfg)
    for obj, name, value in ((f, "mode", "concat"), (f.train, "lr", 1.0), (f.teacher, "rank", 2), (f.loss, "x", 1)):
        with pytest.raises(dataclasses.FrozenInstanceError, match="frozen after preflight"):
            setattr(obj, name, value)
    assert f.to_dict() == cfg.to_dict() and f.to_dict() is not cfg.to_dict()
    cfg.train.lr = 0.5  # the original stays the caller's, and is not the run's
    assert f.train.lr != 0.5
    changed = dataclasses.replace(f, train=dataclasses.replace(f.train, lr=2.0))
    changed.train.lr = 3.0  # a new config is not frozen
    assert changed.train.lr == 3.0 and f.train.lr != 3.0
    for copied in (copy.deepcopy(f), pickle.loads(pickle.dumps(f))):  # ranks and checkpoints copy it whole
        assert copied.to_dict() == f.to_dict()
        with pytest.raises(dataclasses.FrozenInstanceError):
            copied.train.lr = 1.0


def _train_args(tmp_path, stage="teachers", **kw):
    return loop.RunArgs(stage=stage, output_dir=tmp_path / "run", **kw)


def _teachers_dir(tmp_path, rank=4):
    """A teachers/ dir of the tiny recipe's two built-in tasks, saved at teacher.rank ``rank``."""
    cfg = get_recipe("tiny")
    cfg.teacher.rank, cfg.teacher.alpha = rank, float(rank)
    model = build_model(cfg, "teachers", build_backbone(cfg), num_bank_rows=2)
    path = tmp_path / "teachers"
    artifacts.save(model, path, {"t0": 0, "t1": 1})
    return path


def test_adopting_a_teacher_returns_a_new_config_and_leaves_the_old_one(tmp_path):
    path = _teachers_dir(tmp_path, rank=4)
    cfg = get_recipe("tiny")
    cfg.teacher.rank = 2
    before = cfg.to_dict()
    new, rows = artifacts.adopt_teacher(frozen(cfg), path)  # a frozen config can adopt: nothing is assigned
    assert rows == {"t0": 0, "t1": 1}
    assert (new.teacher.rank, new.teacher.alpha) == (4, 4.0) and cfg.to_dict() == before


def test_training_preflight_hands_the_run_a_frozen_config_and_resolves_the_stage_once(tmp_path, monkeypatch):
    """On the tree before the assembly, preflight resolved the stage 4 times (itself, the loader, the meta model's
    build_model and TagiModel) and setup twice more; preflight's config was the caller's, assignable."""
    calls = []
    real = stages.spec
    monkeypatch.setattr(stages, "spec", lambda *a: calls.append(a[0]) or real(*a))
    cfg = get_recipe("tiny")
    checked = loop.preflight(cfg, _train_args(tmp_path))
    assert calls == ["teachers"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        checked.cfg.train.max_steps = 1
    cfg.train.max_steps = 1  # the caller's own config is still its own
    assert checked.cfg.train.max_steps != 1
    run = assembly.assemble(
        checked.spec,
        checked.cfg,
        {},
        checked.tokenizer.special_ids,
        runner="torch",
        rows=len(checked.rows),
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    assert calls == ["teachers"] and run.model.spec is checked.spec  # the assembly took the spec, no name


def test_evaluation_preflight_hands_the_run_a_frozen_config(tmp_path):
    cfg = get_recipe("tiny")
    cfg.mode = "concat"
    checked = evaluate.preflight(cfg, evaluate.EvalArgs(output_dir=tmp_path / "eval", mode="concat"))
    assert checked.spec.mode.name == "concat"
    with pytest.raises(dataclasses.FrozenInstanceError):
        checked.cfg.data.max_source_length = 8


def test_the_measured_step_sets_its_loss_weights_on_a_new_config(monkeypatch):
    """plan/measure.py assigned cfg.loss.kl_weight after building the model: on a frozen config (what a run holds)
    that is an error, and on a shared one it changed the caller's."""
    from tagi_ds import plan
    from tagi_ds.plan import measure

    real = measure.resolve
    monkeypatch.setattr(measure, "resolve", lambda p: (lambda q, c: (q, frozen(c)))(*real(p)))
    p = plan.PlanInput(model="tiny", nodes=1, gpus_per_node=1, stage="none")
    out = measure.measure_step(p, device="cpu")
    assert out["peak"] > 0


# -- the assembly ---------------------------------------------------------------------------------------------
def test_the_assembly_takes_a_resolved_spec_not_a_stage_name():
    cfg = get_recipe("tiny")
    with pytest.raises(TypeError, match="resolved stages.Spec"):
        assembly.assemble("finetune", cfg, {}, {}, runner="none")
    with pytest.raises(TypeError, match="resolved stages.Spec"):
        assembly.meta_model(cfg, "finetune", {})
    with pytest.raises(ValueError, match="for_training"):
        assembly.assemble(stages.spec("finetune", cfg), cfg, {}, {})  # a train run says where the backbone goes


def test_the_assembly_returns_placement_and_teacher_home_as_typed_values():
    cfg = get_recipe("tiny")
    spec = stages.spec("finetune", cfg)
    assert spec.teacher  # the tiny recipe distils: the frozen teacher bank is built by default
    run = assembly.assemble(spec, cfg, {}, {}, runner="torch", rows=3, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert run.placement == E.Placement("whole", "one process, no DeepSpeed")
    assert run.teacher_home == E.TeacherHome(torch.device("cpu"), "steps run on the cpu")
    assert run.runner is run.model and run.device == torch.device("cpu") and run.teacher_backbone is None
    assert {p.dtype for p in run.model.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in run.model.generator.parameters()} == {torch.bfloat16}
    assert not hasattr(run.model.backbone, "tagi_placement") and not hasattr(run.model.teacher, "tagi_home")
    assert run.describe() == ""  # no ZeRO-3: nothing partitioned to describe
    frozen_run = assembly.assemble(spec, cfg, {}, {}, runner="infer", teacher=False, device=torch.device("cpu"))
    assert frozen_run.model.teacher is None and frozen_run.placement == E.inference_placement({})
    assert not any(p.requires_grad for p in frozen_run.model.parameters()) and not frozen_run.model.training
