"""Named recipes: complete starting configs. ``tiny`` is the embedded default.

Shape presets match the public checkpoints' config.json (T5 v1.1 / LM-Adapt, LLaMA-1/2, Llama-3.1-8B,
Llama-3.2-1B, Mistral-7B-v0.3, Qwen2.5-7B, Gemma-2-9B), so a ``--model_name_or_path`` of that family loads
into the same sites, and benchmarks and the planner can random-init or count them.
"""

from __future__ import annotations

import copy

from tagi_ds.config import ConfigError, TagiConfig, from_dict

# Overlays onto TagiConfig() defaults. Values of the paper (Liao et al., NeurIPS 2024; README): rank 32, lr 1e-4
# (Base) / 5e-5 (XL, XXL), 1024 input / 128 output tokens on SNI, 20k finetuning steps with 2% warmup, bf16.
_T5_COMMON = {"arch": "t5", "vocab_size": 32128, "d_kv": 64, "feed_forward_proj": "gated-gelu", "dtype": "bfloat16"}
_PAPER_DATA = {"max_instruction_length": 1024, "max_source_length": 1024, "max_target_length": 128}
_PAPER_HYPER = {"rank": 32, "alpha": 32.0, "hidden": 512, "site_dim": 64}

_DECODER_PAPER = {
    "hypernet": {**_PAPER_HYPER, "fusion": False},
    "teacher": {"rank": 32, "alpha": 32.0},
    "data": _PAPER_DATA,
    "train": {"lr": 5e-5, "max_steps": 20000, "save_steps": 1000},
}
_DECODER_COMMON = {"dtype": "bfloat16", "adapted_stacks": ["decoder"]}


def _tiny_decoder(arch: str, **model) -> dict:
    """A tiny random decoder-only model of ``arch``: 2 layers, GQA (4 query heads, 2 kv heads), CPU-sized."""
    return {
        "model": {
            "arch": arch,
            "vocab_size": 1024,
            "d_model": 64,
            "d_ff": 128,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "adapted_stacks": ["decoder"],
            **model,
        },
        "hypernet": {"fusion": False},
        "train": {"lr": 3e-3, "max_steps": 60, "save_steps": 30},
    }


RECIPES: dict[str, dict] = {
    "tiny": {
        "model": {
            "arch": "t5",
            "vocab_size": 1024,
            "d_model": 64,
            "d_ff": 128,
            "d_kv": 16,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "num_heads": 4,
        },
        "train": {"lr": 3e-3, "max_steps": 60, "save_steps": 30},
    },
    "tiny-llama": _tiny_decoder("llama"),
    "tiny-mistral": _tiny_decoder("mistral", sliding_window=16),
    "tiny-qwen2": _tiny_decoder("qwen2", tie_word_embeddings=True),
    # head_dim 32 != d_model / num_heads, as in Gemma-2 (q is wider than d_model); eager: sdpa cannot soft-cap.
    "tiny-gemma2": _tiny_decoder(
        "gemma2", head_dim=32, sliding_window=16, tie_word_embeddings=True, attn_implementation="eager"
    ),
    "t5-base": {
        "model": {
            **_T5_COMMON,
            "d_model": 768,
            "d_ff": 2048,
            "num_layers": 12,
            "num_decoder_layers": 12,
            "num_heads": 12,
        },
        "hypernet": _PAPER_HYPER,
        "teacher": {"rank": 32, "alpha": 32.0},
        "data": _PAPER_DATA,
        "train": {"lr": 1e-4, "max_steps": 20000, "save_steps": 1000},
    },
    "t5-xl": {
        "model": {
            **_T5_COMMON,
            "d_model": 2048,
            "d_ff": 5120,
            "num_layers": 24,
            "num_decoder_layers": 24,
            "num_heads": 32,
        },
        "hypernet": _PAPER_HYPER,
        "teacher": {"rank": 32, "alpha": 32.0},
        "data": _PAPER_DATA,
        "train": {"lr": 5e-5, "max_steps": 20000, "save_steps": 1000},
    },
    "t5-xxl": {
        "model": {
            **_T5_COMMON,
            "d_model": 4096,
            "d_ff": 10240,
            "num_layers": 24,
            "num_decoder_layers": 24,
            "num_heads": 64,
        },
        "hypernet": _PAPER_HYPER,
        "teacher": {"rank": 32, "alpha": 32.0},
        "data": _PAPER_DATA,
        "train": {"lr": 5e-5, "max_steps": 20000, "save_steps": 1000},
    },
    "llama-7b": {
        "model": {
            **_DECODER_COMMON,
            "arch": "llama",
            "vocab_size": 32000,
            "d_model": 4096,
            "d_ff": 11008,
            "num_layers": 32,
            "num_heads": 32,
            "num_kv_heads": 32,
            "max_position_embeddings": 4096,
        },
        "hypernet": {**_PAPER_HYPER, "fusion": False},
        "teacher": {"rank": 32, "alpha": 32.0},
        "data": _PAPER_DATA,
        "train": {"lr": 5e-5, "max_steps": 20000, "save_steps": 1000},
    },
    "llama-13b": {
        "model": {
            **_DECODER_COMMON,
            "arch": "llama",
            "vocab_size": 32000,
            "d_model": 5120,
            "d_ff": 13824,
            "num_layers": 40,
            "num_heads": 40,
            "num_kv_heads": 40,
            "max_position_embeddings": 4096,
        },
        "hypernet": {**_PAPER_HYPER, "fusion": False},
        "teacher": {"rank": 32, "alpha": 32.0},
        "data": _PAPER_DATA,
        "train": {"lr": 5e-5, "max_steps": 20000, "save_steps": 1000},
    },
    # The decoder-only families researchers start from today (public config.json of each checkpoint). Adapted
    # projections default to q, v like the rest; all of q k v o gate up down can be: --set model.adapted=...
    "llama3-8b": {  # meta-llama/Llama-3.1-8B (Llama-3-8B: the same shapes; RoPE unscaled, context 8192)
        "model": {
            **_DECODER_COMMON,
            "arch": "llama",
            "vocab_size": 128256,
            "d_model": 4096,
            "d_ff": 14336,
            "num_layers": 32,
            "num_heads": 32,
            "num_kv_heads": 8,
            "rope_theta": 500000.0,
            "rope_scaling": 8.0,
            "max_position_embeddings": 131072,
        },
        **_DECODER_PAPER,
    },
    "llama3.2-1b": {  # meta-llama/Llama-3.2-1B: tied embeddings
        "model": {
            **_DECODER_COMMON,
            "arch": "llama",
            "vocab_size": 128256,
            "d_model": 2048,
            "d_ff": 8192,
            "num_layers": 16,
            "num_heads": 32,
            "num_kv_heads": 8,
            "head_dim": 64,
            "rope_theta": 500000.0,
            "rope_scaling": 32.0,
            "max_position_embeddings": 131072,
            "tie_word_embeddings": True,
        },
        **_DECODER_PAPER,
    },
    "mistral-7b": {  # mistralai/Mistral-7B-v0.3: no sliding window (v0.1: 4096, vocab 32000, theta 1e4)
        "model": {
            **_DECODER_COMMON,
            "arch": "mistral",
            "vocab_size": 32768,
            "d_model": 4096,
            "d_ff": 14336,
            "num_layers": 32,
            "num_heads": 32,
            "num_kv_heads": 8,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 32768,
        },
        **_DECODER_PAPER,
    },
    "qwen2.5-7b": {  # Qwen/Qwen2.5-7B: bias in q, k, v (always, in Qwen2's class)
        "model": {
            **_DECODER_COMMON,
            "arch": "qwen2",
            "vocab_size": 152064,
            "d_model": 3584,
            "d_ff": 18944,
            "num_layers": 28,
            "num_heads": 28,
            "num_kv_heads": 4,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 131072,
        },
        **_DECODER_PAPER,
    },
    "gemma2-9b": {  # google/gemma-2-9b: head_dim 256 (q: 3584 -> 4096), tied, sliding window 4096 every other layer
        "model": {
            **_DECODER_COMMON,
            "arch": "gemma2",
            "vocab_size": 256000,
            "d_model": 3584,
            "d_ff": 14336,
            "num_layers": 42,
            "num_heads": 16,
            "num_kv_heads": 8,
            "head_dim": 256,
            "sliding_window": 4096,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": True,
            "attn_implementation": "eager",
        },
        **_DECODER_PAPER,
    },
    # The miniature reproduction (scripts/reproduce.sh, docs/results.md): a small T5 that
    # scripts/pretrain_backbone.py LM-pretrains on the built-in corpus (the T5-LM-Adapt analogue); every stage
    # then loads it with --model_name_or_path. Sized for 2 CPU cores.
    "mini": {
        "model": {
            "arch": "t5",
            "vocab_size": 1024,
            "d_model": 128,
            "d_ff": 256,
            "d_kv": 32,
            "num_layers": 3,
            "num_decoder_layers": 3,
            "num_heads": 4,
        },
        "hypernet": {"rank": 8, "alpha": 16.0, "hidden": 128, "site_dim": 32},
        "teacher": {"rank": 8, "alpha": 16.0},
        "data": {
            "max_instruction_length": 64,
            "max_source_length": 96,
            "max_target_length": 28,
            "tasks_per_batch": 4,
            "examples_per_task": 4,
        },
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
