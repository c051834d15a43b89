"""scripts/merge_lora.py: a concat baseline's shared LoRA merged into its backbone is a backbone dir whose logits
equal the concat model's, which --teacher_model's preflight accepts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tagi_ds import artifacts, data, teacher_model
from tagi_ds.config import ConfigError, apply_overrides
from tagi_ds.model import build_backbone, build_model
from tagi_ds.recipes import get_recipe
from tests.core.test_teacher_model import save_backbone

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "merge_lora.py"


def _script():
    spec = importlib.util.spec_from_file_location("merge_lora", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["merge_lora"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_merged_backbone_gives_the_concat_models_logits(tmp_path):
    base = save_backbone(get_recipe("tiny"), tmp_path / "backbone", init_seed=0)
    cfg = apply_overrides(
        get_recipe("tiny"),
        [f"model.model_name_or_path={base}", "mode=concat", "data.tasks_per_batch=2", "data.examples_per_task=2"],
    )
    tok = data.load_tokenizer(cfg)
    model = build_model(cfg, "finetune", build_backbone(cfg, tok.special_ids))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained LoRA: B not zero
        for b in model.bank.B.values():
            b.copy_(torch.randn(b.shape, generator=g) * 0.2)
    artifacts.save(model, tmp_path / "baseline_lora")

    out = _script().merge(tmp_path / "baseline_lora", tmp_path / "merged")
    assert (out / "tokenizer_config.json").is_file() and (out / "model.safetensors").is_file()
    merged_cfg = teacher_model.check(get_recipe("tiny"), str(out), data.load_tokenizer(get_recipe("tiny")))
    merged = build_backbone(merged_cfg, tok.special_ids).eval()
    model.eval()
    batch = next(iter(data.build_train_loader(cfg, tok, "finetune")))
    with torch.no_grad():
        adapters, _ = model.student_adapters(batch)
        want = model.logits(batch.input_ids, batch.attention_mask, batch.labels, adapters)
        got = merged(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).logits
        bare = model.logits(batch.input_ids, batch.attention_mask, batch.labels, None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(bare, want, atol=1e-3)  # the LoRA changed them: the merge is not a copy


def test_merge_refuses_an_adapter_of_a_random_init_backbone(tmp_path):
    cfg = apply_overrides(get_recipe("tiny"), ["mode=concat"])
    model = build_model(cfg, "finetune", build_backbone(cfg))
    artifacts.save(model, tmp_path / "baseline_lora")
    with pytest.raises(ConfigError, match="trained on a random-init backbone"):
        _script().merge(tmp_path / "baseline_lora", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
