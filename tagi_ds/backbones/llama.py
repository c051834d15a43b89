"""LLaMA (decoder-only): build or load, adapted sites, instruction encoding.

Fusion: none. T5 fuses by letting the decoder cross-attend to the instruction encodings; a decoder-only
model has no cross-attention, and the closest equivalent (the instruction's keys/values as a prefix of
every layer) costs the same attention as concatenating the instruction, which is what TAGI avoids. So
for LLaMA the instruction reaches the model only through the generated adapters (``hypernet.fusion``
must be false; the config says so if it is not).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tagi_ds.backbones.base import DTYPES, check_attention, check_model_dir
from tagi_ds.config import ConfigError, ModelConfig

KINDS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def build(cfg: ModelConfig, pad_id: int = 0, eos_id: int = 1, bos_id: int = 3) -> LlamaForCausalLM:
    attn = check_attention(cfg)
    dtype = DTYPES[cfg.dtype]
    if cfg.model_name_or_path:
        path = check_model_dir(cfg.model_name_or_path)
        return LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn, local_files_only=True)
    config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
                         pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=bos_id, tie_word_embeddings=False)
    return LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=dtype)


def site_names(model: LlamaForCausalLM, cfg: ModelConfig) -> list[tuple[str, str, int, str]]:
    unknown = [k for k in cfg.adapted if k not in KINDS]
    if unknown:
        raise ConfigError(f"model.adapted: unknown LLaMA projection {unknown[0]!r} (LLaMA: {' '.join(KINDS)})")
    if cfg.adapted_stacks != ["decoder"]:
        raise ConfigError(f"model.adapted_stacks must be [decoder] for LLaMA, got {cfg.adapted_stacks}")
    return [(f"model.layers.{i}.{KINDS[k]}", "decoder", i, k)
            for i in range(model.config.num_hidden_layers) for k in cfg.adapted]


def body(model: LlamaForCausalLM) -> torch.nn.Module:
    """The part that reads instructions: the decoder stack without the LM head."""
    return model.model


def encode(model: LlamaForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           first_last: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Body states ``[K, L, d]`` (final, normalised) and, if asked, the first layer's. Right-padded input."""
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=first_last,
                      use_cache=False, return_dict=True)
    return out.last_hidden_state, (out.hidden_states[1] if first_last else None)


def logits(model: LlamaForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           labels: torch.Tensor | None = None, prefix=None, prefix_mask=None, cache=None) -> torch.Tensor:
    """Logits ``[B, L, V]`` over prompt + target (labels align with input_ids; shifting is the loss's job).
    ``prefix``, ``prefix_mask`` and ``cache`` are T5 fusion's: always None here (LLaMA has no encoder)."""
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True).logits
