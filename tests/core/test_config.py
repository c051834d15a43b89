"""The config tree: recipes, overrides, errors, and preset shapes against the public checkpoints."""

import pytest
import torch

from tagi_ds.config import ConfigError, apply_overrides, from_dict
from tagi_ds.model import build_backbone
from tagi_ds.recipes import RECIPES, get_recipe


def test_every_recipe_validates():
    for name in RECIPES:
        assert get_recipe(name).recipe == name


def test_overrides_coerce_types():
    cfg = apply_overrides(
        get_recipe("tiny"),
        [
            "hypernet.rank=16",
            "loss.temperature=1.5",
            "hypernet.fusion=false",
            "model.adapted=q,k,v",
            "model.model_name_or_path=none",
        ],
    )
    assert cfg.hypernet.rank == 16 and cfg.loss.temperature == 1.5 and cfg.hypernet.fusion is False
    assert cfg.model.adapted == ["q", "k", "v"] and cfg.model.model_name_or_path is None


@pytest.mark.parametrize(
    "item, match",
    [
        ("hypernet.rnak=4", "hypernet.rnak: unknown config key"),
        ("nosuch.x=1", "nosuch: unknown config key"),
        ("hypernet.rank=four", r"hypernet.rank: expects int \('four'\)"),
        ("hypernet.fusion=maybe", "hypernet.fusion: expects bool"),
        ("hypernet=3", "is a section"),
        ("rank", "expected KEY=VALUE"),
    ],
)
def test_bad_overrides_name_key_and_value(item, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(get_recipe("tiny"), [item])


def test_validate_rejects_bad_choices():
    with pytest.raises(ConfigError, match="mode: must be one of"):
        from_dict({"mode": "prompting"}).validate()
    with pytest.raises(ConfigError, match="fusion: true is T5-only"):
        from_dict({"model": {"arch": "llama"}}).validate()
    with pytest.raises(ConfigError, match="unknown recipe|is not a recipe"):
        get_recipe("t5-small")


# Parameter counts of the public checkpoints (google/t5-v1_1-*, LLaMA-1): the presets must match them.
# transformers 5 ties T5's lm_head to the shared embedding, so a T5 preset has vocab x d_model fewer.
PUBLIC = {
    "t5-base": 247.6e6 - 32128 * 768,
    "t5-xl": 2.85e9 - 32128 * 2048,
    "t5-xxl": 11.14e9 - 32128 * 4096,
    "llama-7b": 6.74e9,
    "llama-13b": 13.02e9,
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_shape_presets_match_public_checkpoints(name):
    cfg = get_recipe(name)
    with torch.device("meta"):
        model = build_backbone(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - PUBLIC[name]) / PUBLIC[name] < 0.01, f"{name}: {n / 1e9:.3f}B params"


def test_flash_attention_without_extra_is_a_clear_error():
    cfg = apply_overrides(get_recipe("tiny-llama"), ["model.attn_implementation=flash_attention_2"])
    with pytest.raises(ConfigError, match="flash-attn extra"):
        build_backbone(cfg)


def test_missing_model_dir_is_a_clear_error(tmp_path):
    cfg = apply_overrides(get_recipe("tiny"), [f"model.model_name_or_path={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="--model_name_or_path .*nope"):
        build_backbone(cfg)


def test_rules_are_declared_for_fields_of_their_section_and_hold_for_every_recipe():
    import dataclasses

    from tagi_ds import config

    for section in (
        config.ModelConfig,
        config.HypernetConfig,
        config.TeacherConfig,
        config.LossConfig,
        config.DataConfig,
        config.TrainConfig,
        config.TagiConfig,
    ):
        assert set(section.RULES) <= {f.name for f in dataclasses.fields(section)}, section.__name__
    for name in RECIPES:
        get_recipe(name).validate()
    with pytest.raises(ConfigError, match=r"train.keep_last: must be >= 0 \(-1\)"):
        apply_overrides(get_recipe("tiny"), ["train.keep_last=-1"]).validate()
    with pytest.raises(ConfigError, match=r"loss.param_weight: expects a finite float \('nan'\)"):
        apply_overrides(get_recipe("tiny"), ["loss.param_weight=nan"])


def test_each_field_is_declared_once_with_a_docstring_and_choices_come_from_its_literal():
    import dataclasses
    from typing import Literal, get_args, get_origin, get_type_hints

    from tagi_ds import config

    for section in (
        config.ModelConfig,
        config.HypernetConfig,
        config.TeacherConfig,
        config.LossConfig,
        config.DataConfig,
        config.TrainConfig,
        config.TagiConfig,
    ):
        docs, hints = config.field_docs(section), get_type_hints(section)
        for f in dataclasses.fields(section):
            if dataclasses.is_dataclass(f.default_factory() if callable(f.default_factory) else None):
                continue
            assert docs.get(f.name), f"{section.__name__}.{f.name} has no docstring"
            if get_origin(hints[f.name]) is Literal:
                assert f.name not in section.RULES, f"{section.__name__}.{f.name}: choices written twice"
                assert config.rule_of(section, f.name).text == f"one of {', '.join(get_args(hints[f.name]))}"
    with pytest.raises(ConfigError, match=r"model.dtype: must be one of float32, bfloat16, float16 \('fp8'\)"):
        apply_overrides(get_recipe("tiny"), ["model.dtype=fp8"]).validate()


def test_readme_config_table_is_the_generated_one():
    from pathlib import Path

    from tagi_ds.config import markdown

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    start = "<!-- config table: generated by python -m tagi_ds.config --markdown -->\n"
    held = readme[readme.index(start) + len(start) : readme.index("<!-- end of config table -->")]
    assert held == markdown() + "\n", "README's config table is stale: paste python -m tagi_ds.config --markdown"


def test_a_retired_key_loads_from_a_saved_config_and_is_refused_when_set():
    """data.num_workers was documented but never used, and is gone: an older config.json that holds it (an artifact,
    a checkpoint's run) still loads, and ``--set data.num_workers=...`` says why it is refused."""
    from tagi_ds.config import TagiConfig

    old = TagiConfig().to_dict()
    old["data"]["num_workers"] = 0
    assert from_dict(old) == TagiConfig()
    with pytest.raises(ConfigError, match=r"^data.num_workers: removed: it was never used .*\(\'2\'\)$"):
        apply_overrides(TagiConfig(), ["data.num_workers=2"])
