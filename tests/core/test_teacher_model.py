"""tagi_ds.teacher_model in one process: the KL target of a run with --teacher_model is the teacher model's own
distribution on the teacher view, its head included; the student's backbone and the bank do not enter it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tagi_ds import data, teacher_model
from tagi_ds.assembly import build_teacher_model
from tagi_ds.config import ConfigError, apply_overrides
from tagi_ds.losses import kl_loss, target_rows
from tagi_ds.model import build_backbone, build_model
from tagi_ds.recipes import get_recipe

REPO = Path(__file__).resolve().parents[2]


def save_backbone(cfg, out: Path, init_seed: int, tokenizer: bool = True) -> Path:
    """A tiny backbone dir with the built-in tokenizer as a T5Tokenizer (as scripts/pretrain_backbone.py writes
    one); ``tokenizer=False``: weights and config only."""
    spec = importlib.util.spec_from_file_location("pretrain_backbone", REPO / "scripts" / "pretrain_backbone.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    build_backbone(apply_overrides(cfg, [f"model.init_seed={init_seed}"])).save_pretrained(out)
    if tokenizer:
        mod.build_tokenizer()[0].save_pretrained(out)
    return out


@pytest.mark.parametrize("recipe", ["tiny", "tiny-llama"])  # T5 (logits rows) and decoder-only (its own LM head)
def test_kl_target_is_the_teacher_models_distribution(recipe, tmp_path):
    cfg = apply_overrides(
        get_recipe(recipe),
        ["data.tasks_per_batch=2", "data.examples_per_task=2", "loss.param_weight=0", "loss.temperature=2.0"],
    )
    tok = data.load_tokenizer(cfg)
    causal = cfg.model.arch != "t5"
    # A decoder-only teacher dir without a tokenizer: the built-in one as a T5Tokenizer has no bos (next test).
    teacher_dir = save_backbone(cfg, tmp_path / "teacher", init_seed=7, tokenizer=not causal)
    tcfg = teacher_model.check(cfg, str(teacher_dir), tok)
    model = build_model(cfg, "finetune", build_backbone(cfg, tok.special_ids))
    assert model.teacher is None  # no bank: --teacher_model alone gives the KL target
    model.teacher_model = build_teacher_model(tcfg, {}, tok.special_ids)
    model.train()
    assert not model.teacher_model.training and model.backbone.training  # the target has no dropout
    assert not any(p.requires_grad for p in model.teacher_model.parameters())
    batch = next(iter(data.build_train_loader(cfg, tok, "finetune", teacher_view=True)))
    assert batch.teacher_input_ids is not None and batch.teacher_index is None
    model.eval()  # dropout off in the student too, so that the reference below sees the same student logits
    loss, terms = model(batch)
    assert set(terms) == {"ce", "kl"} and terms["kl"] > 0

    with torch.no_grad():
        adapters, states = model.student_adapters(batch)
        student = model.logits(batch.input_ids, batch.attention_mask, batch.labels, adapters, batch, states)
        s_rows, labels = target_rows(student, batch.labels, causal)
        teacher = model.teacher_model(
            input_ids=batch.teacher_input_ids,
            attention_mask=batch.teacher_attention_mask,
            labels=batch.teacher_labels,
        ).logits  # the HF model's own forward: not tagi-ds's path
        t_rows, _ = target_rows(teacher, batch.teacher_labels, causal)
        expected = kl_loss(s_rows, t_rows, 2.0)
    torch.testing.assert_close(terms["kl"], expected, rtol=1e-5, atol=1e-6)
    # Not the student backbone's own distribution on the teacher view (what a zero teacher bank would give).
    with torch.no_grad():
        own = model.logits(batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_labels, None)
    assert not torch.allclose(kl_loss(s_rows, target_rows(own, batch.teacher_labels, causal)[0], 2.0), expected)
    loss.backward()  # the KL's gradient reaches the hypernetwork, not the teacher
    assert all(p.grad is None for p in model.teacher_model.parameters())


def test_flag_rules_are_one_line_each():
    cfg = get_recipe("tiny")  # loss.param_weight > 0 by default
    with pytest.raises(ConfigError, match="needs teacher LoRA deltas, which a full teacher model has none of"):
        teacher_model.check_flags(cfg, "T", None, distils=True)
    teacher_model.check_flags(cfg, "T", "BANK", distils=True)  # KL from the model, alignment from the bank
    no_param = apply_overrides(cfg, ["loss.param_weight=0"])
    teacher_model.check_flags(no_param, "T", None, distils=True)
    with pytest.raises(ConfigError, match="--teachers BANK: unused with --teacher_model"):
        teacher_model.check_flags(no_param, "T", "BANK", distils=True)
    with pytest.raises(ConfigError, match="but loss.kl_weight=0"):
        teacher_model.check_flags(apply_overrides(cfg, ["loss.kl_weight=0"]), "T", "BANK", distils=True)
    with pytest.raises(ConfigError, match="unused by this run"):
        teacher_model.check_flags(cfg, "T", None, distils=False)
    assert teacher_model.needs_bank(cfg, "T", True) and not teacher_model.needs_bank(no_param, "T", True)
    assert teacher_model.needs_bank(no_param, None, True) and not teacher_model.needs_bank(cfg, None, False)


def test_a_larger_teacher_is_accepted_and_its_shape_is_its_own(tmp_path):
    """The hidden size and depth may differ from the student's (only family, vocabulary and tokenizer must match)."""
    cfg = get_recipe("tiny")
    big = save_backbone(apply_overrides(cfg, ["model.d_model=96", "model.num_layers=3"]), tmp_path / "big", 1)
    tcfg = teacher_model.check(cfg, str(big), data.load_tokenizer(cfg))
    assert (tcfg.model.d_model, tcfg.model.num_layers) == (96, 3) and tcfg.model.vocab_size == cfg.model.vocab_size
    assert tcfg.model.model_name_or_path == str(big) and cfg.model.model_name_or_path in ("", None)


def test_a_teacher_tokenizer_that_differs_is_refused(tmp_path):
    """A decoder-only student (the built-in tokenizer starts with bos 3) and a teacher dir whose tokenizer has no
    bos: one line naming the dir and the ids."""
    cfg = get_recipe("tiny-llama")
    bad = save_backbone(cfg, tmp_path / "t5tok", init_seed=1)
    with pytest.raises(ConfigError, match=r"--teacher_model .*t5tok: its tokenizer differs .*'bos_id': None"):
        teacher_model.check(cfg, str(bad), data.load_tokenizer(cfg))
