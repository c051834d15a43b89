"""Named recipes: complete starting configs. ``tiny`` is the embedded default.

Shape presets match the public checkpoints' layer shapes (T5 v1.1 / LM-Adapt, LLaMA-1/2), so a
``--model_name_or_path`` of that family loads into the same sites, and benchmarks can random-init them.
"""

from __future__ import annotations

import copy

from tagi_ds.config import ConfigError, TagiConfig, from_dict

# Overlays onto TagiConfig() defaults. Paper values (TAGI.md): rank 32, lr 1e-4 (Base) / 5e-5 (XL, XXL),
# 1024 input / 128 output tokens on SNI, 20k finetuning steps with 2% warmup, bf16.
_T5_COMMON = {"arch": "t5", "vocab_size": 32128, "d_kv": 64, "feed_forward_proj": "gated-gelu", "dtype": "bfloat16"}
_PAPER_DATA = {"max_instruction_length": 1024, "max_source_length": 1024, "max_target_length": 128}
_PAPER_HYPER = {"rank": 32, "alpha": 32.0, "hidden": 512, "site_dim": 64}

RECIPES: dict[str, dict] = {
    "tiny": {
        "model": {"arch": "t5", "vocab_size": 1024, "d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 2,
                  "num_decoder_layers": 2, "num_heads": 4},
        "train": {"lr": 3e-3, "max_steps": 60, "save_steps": 30},
    },
    "tiny-llama": {
        "model": {"arch": "llama", "vocab_size": 1024, "d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 4,
                  "num_kv_heads": 2, "adapted_stacks": ["decoder"]},
        "hypernet": {"fusion": False},
        "train": {"lr": 3e-3, "max_steps": 60, "save_steps": 30},
    },
    "t5-base": {
        "model": {**_T5_COMMON, "d_model": 768, "d_ff": 2048, "num_layers": 12, "num_decoder_layers": 12,
                  "num_heads": 12},
        "hypernet": _PAPER_HYPER, "teacher": {"rank": 32, "alpha": 32.0}, "data": _PAPER_DATA,
        "train": {"lr": 1e-4, "max_steps": 20000, "save_steps": 1000},
    },
    "t5-xl": {
        "model": {**_T5_COMMON, "d_model": 2048, "d_ff": 5120, "num_layers": 24, "num_decoder_layers": 24,
                  "num_heads": 32},
        "hypernet": _PAPER_HYPER, "teacher": {"rank": 32, "alpha": 32.0}, "data": _PAPER_DATA,
        "train": {"lr": 5e-5, "max_steps": 20000, "save_steps": 1000},
    },
    "t5-xxl": {
        "model": {**_T5_COMMON, "d_model": 4096, "d_ff": 10240, "num_layers": 24, "num_decoder_layers": 24,
                  "num_heads": 64},
        "hypernet": _PAPER_HYPER, "teacher": {"rank": 32, "alpha": 32.0}, "data": _PAPER_DATA,
        "train": {"lr": 5e-5, "max_steps": 20000, "save_steps": 1000},
    },
    "llama-7b": {
        "model": {"arch": "llama", "vocab_size": 32000, "d_model": 4096, "d_ff": 11008, "num_layers": 32,
                  "num_heads": 32, "num_kv_heads": 32, "max_position_embeddings": 4096, "dtype": "bfloat16",
                  "adapted_stacks": ["decoder"]},
        "hypernet": {**_PAPER_HYPER, "fusion": False}, "teacher": {"rank": 32, "alpha": 32.0}, "data": _PAPER_DATA,
        "train": {"lr": 5e-5, "max_steps": 20000, "save_steps": 1000},
    },
    "llama-13b": {
        "model": {"arch": "llama", "vocab_size": 32000, "d_model": 5120, "d_ff": 13824, "num_layers": 40,
                  "num_heads": 40, "num_kv_heads": 40, "max_position_embeddings": 4096, "dtype": "bfloat16",
                  "adapted_stacks": ["decoder"]},
        "hypernet": {**_PAPER_HYPER, "fusion": False}, "teacher": {"rank": 32, "alpha": 32.0}, "data": _PAPER_DATA,
        "train": {"lr": 5e-5, "max_steps": 20000, "save_steps": 1000},
    },
    # The miniature reproduction (scripts/reproduce.sh, docs/results.md): a small T5 that
    # scripts/pretrain_backbone.py LM-pretrains on the built-in corpus (the T5-LM-Adapt analogue); every stage
    # then loads it with --model_name_or_path. Sized for 2 CPU cores.
    "mini": {
        "model": {"arch": "t5", "vocab_size": 1024, "d_model": 128, "d_ff": 256, "d_kv": 32, "num_layers": 3,
                  "num_decoder_layers": 3, "num_heads": 4},
        "hypernet": {"rank": 8, "alpha": 16.0, "hidden": 128, "site_dim": 32},
        "teacher": {"rank": 8, "alpha": 16.0},
        "data": {"max_instruction_length": 64, "max_source_length": 96, "max_target_length": 28,
                 "tasks_per_batch": 4, "examples_per_task": 4},
        "train": {"lr": 1e-3, "max_steps": 300, "save_steps": 1000},
    },
}


def get_recipe(name: str) -> TagiConfig:
    """The named recipe as a validated TagiConfig (a fresh copy)."""
    if name not in RECIPES:
        raise ConfigError(f"--recipe {name!r} is not a recipe; known: {', '.join(RECIPES)}")
    cfg = from_dict(copy.deepcopy(RECIPES[name]))
    cfg.recipe = name
    return cfg.validate()
