"""Smoke of scripts/pretrain_backbone.py (2 steps): the saved dir loads as a tagi-ds backbone + tokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from tagi_ds.config import apply_overrides
from tagi_ds.data import SentencePieceTokenizer, builtin_suite, format_concat, load_tokenizer
from tagi_ds.model import build_backbone
from tagi_ds.recipes import get_recipe

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_backbone.py"


def _script():
    spec = importlib.util.spec_from_file_location("pretrain_backbone", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pretrain_backbone_saves_a_loadable_model_and_tokenizer(tmp_path):
    out = tmp_path / "backbone"
    _script().main(["--out", str(out), "--steps", "2", "--batch", "4", "--log_every", "1"])
    assert (out / "config.json").is_file() and not (tmp_path / "backbone.tmp").exists()

    cfg = apply_overrides(get_recipe("mini"), [f"model.model_name_or_path={out}"])
    tok = load_tokenizer(cfg)  # AutoTokenizer on the model dir
    builtin = SentencePieceTokenizer()
    task = builtin_suite(0)["test"][0]
    for text in (format_concat(task, task.instances[0].input, "def_pos"), task.instances[0].outputs[0]):
        assert tok.encode(text) == builtin.encode(text)  # same ids as the built-in tokenizer
    assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, 1024)

    model = build_backbone(cfg, {"pad_id": tok.pad_id, "eos_id": tok.eos_id})
    assert model.config.d_model == get_recipe("mini").model.d_model
    # Deterministic from the seed: a second run gives the same weights.
    _script().main(["--out", str(tmp_path / "again"), "--steps", "2", "--batch", "4", "--log_every", "1"])
    again = build_backbone(apply_overrides(cfg, [f"model.model_name_or_path={tmp_path / 'again'}"]))
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_adapted_t5_ffn_output_projection_runs():
    """T5's gated FFN reads ``wo.weight.dtype``: an adapted ``wo`` must expose its base layer's weight."""
    from tagi_ds.adapters import AdapterState
    from tagi_ds.backbones import t5
    from tagi_ds.backbones.base import inject

    cfg = apply_overrides(get_recipe("tiny"), ["model.adapted=q,v,wi_0,wi_1,wo"])
    model = build_backbone(cfg)
    sites = inject(model, t5.site_names(model, cfg.model), AdapterState())
    assert any(s.kind == "wo" for s in sites)
    wo = model.get_submodule(next(s.name for s in sites if s.kind == "wo"))
    assert wo.weight is wo.base_layer.weight
    ids = torch.ones(2, 5, dtype=torch.long)
    assert model(input_ids=ids, decoder_input_ids=ids).logits.shape == (2, 5, cfg.model.vocab_size)
