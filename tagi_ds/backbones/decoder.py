"""Decoder-only backbones (every family a ``tagi_ds.families.decoder_family`` record describes: llama, mistral,
qwen2, gemma2): build or load, adapted sites, instruction encoding, logits.

Each family is transformers' own class (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
``Gemma2ForCausalLM``), named by its record; ``model.arch`` is the checkpoint's ``model_type``, so Llama-1/2/3 are
all ``llama``. What differs between them is the class's business (GQA, RoPE base and scaling, q/k/v bias in Qwen2,
sliding-window attention, Gemma-2's embedding scale and soft-capping, tied embeddings) or the record's (the
constants of the public checkpoints, how the HF config takes the sliding window); this module only lays out the
adapted projections, which all of them place the same way (the record's ``projections`` under
``model.layers.{i}``: ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``), each with its own shape (under GQA
k and v are ``num_kv_heads * head_dim`` wide, q ``num_heads * head_dim``, which for Gemma-2 is not ``d_model``
either).

Fusion: none. T5 fuses by letting the decoder cross-attend to the instruction encodings; a decoder-only
model has no cross-attention, and the closest equivalent (the instruction's keys/values as a prefix of
every layer) costs the same attention as concatenating the instruction, which is what TAGI avoids. So
here the instruction reaches the model only through the generated adapters (``hypernet.fusion`` must be
false; the config says so if it is not).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
import transformers
from transformers import PretrainedConfig, PreTrainedModel

from tagi_ds import families
from tagi_ds.backbones.base import DTYPES, check_attention, check_model_dir
from tagi_ds.config import ConfigError, ModelConfig
from tagi_ds.families import Family


def family(arch: str) -> tuple[type[PretrainedConfig], type[PreTrainedModel], Family]:
    """``(config class, model class, record)`` of a decoder-only ``model.arch`` (its record names the classes;
    transformers imports a family's modeling code only when its class is first used: all eagerly cost ~3 s)."""
    record = families.get(arch)
    return getattr(transformers, record.config_class), getattr(transformers, record.model_class), record


# Llama-3.1 / 3.2 RoPE scaling, apart from the factor.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def hf_config(cfg: ModelConfig, pad_id: int = 0, eos_id: int = 1, bos_id: int | None = 3) -> PretrainedConfig:
    """The family's HF config for ``cfg``'s shape (random init; a local checkpoint brings its own)."""
    config_cls, _, record = family(cfg.arch)
    head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {**LLAMA3_ROPE, "factor": cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=rope,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=bos_id,
        **record.constants,
    )
    kwargs.update(dict.fromkeys(record.head_dim_keys, head_dim))
    if record.sliding_window:
        kwargs["sliding_window"] = cfg.sliding_window or None
        if record.window_switch:
            kwargs[record.window_switch] = bool(cfg.sliding_window)
    return config_cls(**kwargs)


def build(cfg: ModelConfig, pad_id: int = 0, eos_id: int = 1, bos_id: int | None = 3) -> PreTrainedModel:
    """Load the family's class from a local dir (its ``model_type`` must be ``model.arch``), or build the
    configured shape with random init. (``TagiConfig.validate`` rejects what a family cannot honour.)"""
    attn = check_attention(cfg)
    dtype = DTYPES[cfg.dtype]
    _, model_cls, record = family(cfg.arch)
    if cfg.model_name_or_path:
        path = check_model_dir(cfg.model_name_or_path)
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
        if model_type != record.model_type:
            raise ConfigError(
                f"--model_name_or_path {str(path)!r}: config.json has model_type {model_type!r} but "
                f"model.arch is {cfg.arch!r}; pick the recipe of that family or --set "
                f"model.arch={model_type}"
            )
        model = model_cls.from_pretrained(path, dtype=dtype, attn_implementation=attn, local_files_only=True)
    else:
        model = model_cls._from_config(hf_config(cfg, pad_id, eos_id, bos_id), attn_implementation=attn, dtype=dtype)
    return fp32_rotary(model)


def fp32_rotary(model: torch.nn.Module) -> torch.nn.Module:
    """Every rotary embedding's frequency buffers (``inv_freq``, ``original_inv_freq``, ...) recomputed in fp32.

    Built under ``deepspeed.zero.Init``, they come out in the training dtype: DeepSpeed's tensor-constructor wrappers
    cast every float tensor created in the context (``torch.arange(..., dtype=torch.float)`` included), and
    transformers before 5.2x does not guard RoPE against it. In bf16 the phases ``position * inv_freq`` are then
    wrong by ~1.4 rad at position 1152: a LLaMA trained on the partitioned path would see broken positions beyond a
    few hundred tokens, silently. The buffers are non-persistent (never in a checkpoint), so each is rebuilt by a
    fresh module of the same class, outside the context, where the family computes them in fp32 as it always does.
    """
    for module in model.modules():
        names = [n for n, b in module._buffers.items() if b is not None and "inv_freq" in n]
        if not names or not type(module).__name__.endswith("RotaryEmbedding"):
            continue
        if all(module._buffers[n].dtype == torch.float32 for n in names):
            continue
        fresh = type(module)(module.config)
        for n in names:
            module._buffers[n] = fresh._buffers[n].to(module._buffers[n].device)
    return model


def site_names(model: PreTrainedModel, cfg: ModelConfig) -> list[tuple[str, str, int, str]]:
    record = families.get(cfg.arch)
    kinds = record.projections
    unknown = [k for k in cfg.adapted if k not in kinds]
    if unknown:
        raise ConfigError(
            f"model.adapted: unknown {cfg.arch} projection {unknown[0]!r} ({cfg.arch}: {' '.join(kinds)})"
        )
    if cfg.adapted_stacks != list(record.stacks):
        raise ConfigError(
            f"model.adapted_stacks must be [{', '.join(record.stacks)}] for the decoder-only "
            f"model.arch={cfg.arch}, got {cfg.adapted_stacks}"
        )
    return [
        (f"model.layers.{i}.{kinds[k]}", "decoder", i, k)
        for i in range(getattr(model.config, record.shape["num_layers"]))
        for k in cfg.adapted
    ]


def body(model: PreTrainedModel) -> torch.nn.Module:
    """The part that reads instructions: the decoder stack without the LM head."""
    return model.model


def encode(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, first_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Body states ``[K, L, d]`` (final, normalised) and, if asked, the first layer's. Right-padded input."""
    out = model.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=first_last,
        use_cache=False,
        return_dict=True,
    )
    return out.last_hidden_state, (out.hidden_states[1] if first_last else None)


def logits(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
    prefix=None,
    prefix_mask=None,
    cache=None,
) -> torch.Tensor:
    """Logits ``[B, L, V]`` over prompt + target (labels align with input_ids; shifting is the loss's job).
    ``prefix``, ``prefix_mask`` and ``cache`` are T5 fusion's: always None here (no encoder)."""
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True).logits


def head_inputs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
    prefix=None,
    prefix_mask=None,
    cache=None,
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """What the training loss projects: the final hidden states ``[B, L, d]`` and ``head``, ``[n, d] -> [n, V]``
    (the LM head, and Gemma-2's final soft-capping), so that the loss computes logits only at target tokens and a
    chunk at a time (``tagi_ds.losses.token_sums``). ``head(x)`` equals ``logits`` at the same rows."""
    states = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True)
    return states.last_hidden_state, lambda h: head(model, h)


def head(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """``[n, d] -> [n, V]``, as the family's ``forward`` computes its logits from the final hidden states."""
    out = model.lm_head(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        out = torch.tanh(out / cap) * cap
    return out
