"""ds_configs/*.json: plain DeepSpeed settings, real values, valid for deepspeed's own config models."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"z3.json": 3, "z3_tiny.json": 3, "z3_offload.json": 3, "z2.json": 2}

# Owned by the tagi-ds config and injected when the engine is built; a copy here would silently disagree.
INJECTED_KEYS = {
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "optimizer",
    "scheduler",
    "gradient_clipping",
    "fp16",
    "bf16",
    "amp",
    "torch_autocast",
    "data_types",
}


def _load(name):
    return json.loads((ROOT / "ds_configs" / name).read_text())


def _walk(obj, path=""):
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _walk(value, f"{path}.{key}" if path else key)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _walk(value, f"{path}[{i}]")
    else:
        yield path, obj


def test_all_configs_present():
    assert sorted(p.name for p in (ROOT / "ds_configs").glob("*.json")) == sorted(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_no_auto_and_no_injected_keys(name):
    cfg = _load(name)
    autos = [path for path, value in _walk(cfg) if isinstance(value, str) and value.strip().lower() == "auto"]
    assert autos == [], f"{name}: 'auto' values at {autos}"
    assert not INJECTED_KEYS & set(cfg), f"{name}: keys owned by the tagi-ds config: {INJECTED_KEYS & set(cfg)}"
    assert cfg["wall_clock_breakdown"] is False
    assert cfg["steps_per_print"] >= 10**6


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_zero_section_validates_with_deepspeed(name):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = _load(name)["zero_optimization"]
    # strict=True: DeepSpeed's models otherwise drop "auto" values silently; extra keys are always rejected.
    model = DeepSpeedZeroConfig(strict=True, **zero)
    assert int(model.stage) == CONFIGS[name]
    assert model.overlap_comm is True and model.contiguous_gradients is True
    deprecated = [
        field
        for field, info in type(model).model_fields.items()
        if (info.json_schema_extra or {}).get("deprecated") and field in model.model_fields_set
    ]
    assert deprecated == [], f"{name}: deprecated zero_optimization keys {deprecated}"
    if CONFIGS[name] == 3:
        assert model.gather_16bit_weights_on_model_save is False
        assert model.param_persistence_threshold == zero["stage3_param_persistence_threshold"]
        assert model.prefetch_bucket_size == zero["stage3_prefetch_bucket_size"]
    if name == "z3_offload.json":
        for part in (model.offload_optimizer, model.offload_param):
            assert part is not None and part.device == "cpu" and part.pin_memory is True
    else:
        assert model.offload_optimizer is None and model.offload_param is None


def test_unknown_zero_key_is_rejected():
    """The check above has teeth: deepspeed's model forbids extra keys."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    with pytest.raises(ValueError):
        DeepSpeedZeroConfig(strict=True, **{**_load("z3.json")["zero_optimization"], "stage3_prefetch_bucket": 1})


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_full_config_after_injection(name):
    """With batch and precision injected (as the engine does) DeepSpeed parses the whole dict."""
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = {
        **_load(name),
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 3,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
    }
    ds = DeepSpeedConfig(cfg)
    assert ds.zero_optimization_stage == CONFIGS[name]
    assert ds.train_batch_size == 6  # world size 1 without a process group
    assert ds.bfloat16_config.enabled and ds.gradient_clipping == 1.0 and not ds.wall_clock_breakdown
    assert ds.zero_force_ds_cpu_optimizer is (name != "z3_offload.json")


def test_z3_tiny_is_z3_with_every_tensor_partitioned():
    """The tiny recipes' default: z3.json but threshold 0 (their tensors are all below z3's 1e5), so the embedded
    default run partitions its backbone; smaller buckets only because the tiny model is tiny."""
    z3, tiny = _load("z3.json")["zero_optimization"], _load("z3_tiny.json")["zero_optimization"]
    assert tiny["stage3_param_persistence_threshold"] == 0
    differ = {k for k in z3 if z3[k] != tiny.get(k)} | (tiny.keys() - z3.keys())
    assert differ == {"stage3_param_persistence_threshold", "stage3_prefetch_bucket_size", "reduce_bucket_size"}
    from tagi_ds.cli import DS_DEFAULT_HELP, base_parser
    from tagi_ds.recipes import RECIPES
    from tagi_ds.runtime.engine import DEFAULT_DS_CONFIG, default_ds_config

    tinies = [n for n in RECIPES if n.startswith("tiny")]
    assert len(tinies) >= 5 and {default_ds_config(n).name for n in tinies} == {"z3_tiny.json"}  # was 2 of 5
    # --help states the same rule (it used to say z3.json for every recipe)
    assert f"ds_configs/{default_ds_config('tiny').name}" in DS_DEFAULT_HELP
    assert f"ds_configs/{DEFAULT_DS_CONFIG.name}" in DS_DEFAULT_HELP
    assert DS_DEFAULT_HELP in " ".join(base_parser("pretrain.py", "").format_help().split())
    assert default_ds_config("t5-xl") == default_ds_config("mini") == DEFAULT_DS_CONFIG
