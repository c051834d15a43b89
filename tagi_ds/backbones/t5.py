"""T5 (encoder-decoder): build or load, adapted sites, instruction encoding, fusion-in-decoder."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from tagi_ds import families
from tagi_ds.backbones import t5_attention
from tagi_ds.backbones.base import DTYPES, cache_kwarg, check_attention, check_model_dir
from tagi_ds.config import ConfigError, ModelConfig

FAMILY = families.get("t5")
ATTN_KINDS = tuple(k for k, where in FAMILY.projections.items() if where == "attention")
FFN_KINDS = tuple(k for k, where in FAMILY.projections.items() if where == "ffn")


def build(cfg: ModelConfig, pad_id: int = 0, eos_id: int = 1, bos_id: int | None = None) -> T5ForConditionalGeneration:
    """Load from a local dir, or build the configured shape with random init. transformers 5 always ties
    T5's lm_head to the shared embedding; built configs keep its default output scaling (d_model^-0.5).
    ``bos_id``: the protocol's; T5 has no beginning-of-sequence token."""
    attn = t5_attention.implementation(check_attention(cfg))  # sdpa: with the position bias merged once per stack
    dtype = DTYPES[cfg.dtype]
    if cfg.model_name_or_path:
        path = check_model_dir(cfg.model_name_or_path)
        return T5ForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=attn, local_files_only=True
        )
    config = T5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads,
        feed_forward_proj=cfg.feed_forward_proj,
        dropout_rate=0.0,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        decoder_start_token_id=pad_id,
    )
    return T5ForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=dtype)


def site_names(model: T5ForConditionalGeneration, cfg: ModelConfig) -> list[tuple[str, str, int, str]]:
    """``(module_name, stack, layer, kind)`` for every adapted projection, in a fixed order."""
    unknown = [k for k in cfg.adapted if k not in ATTN_KINDS + FFN_KINDS]
    if unknown:
        raise ConfigError(
            f"model.adapted: unknown T5 projection {unknown[0]!r} (T5: {' '.join(ATTN_KINDS + FFN_KINDS)})"
        )
    bad = [s for s in cfg.adapted_stacks if s not in FAMILY.stacks]
    if bad:
        raise ConfigError(f"model.adapted_stacks: unknown T5 stack {bad[0]!r} ({' '.join(FAMILY.stacks)})")
    out = []
    for stack, prefix, n_layers in (
        ("encoder", "encoder", model.config.num_layers),
        ("decoder", "decoder", model.config.num_decoder_layers),
        ("cross", "decoder", model.config.num_decoder_layers),
    ):
        if stack not in cfg.adapted_stacks:
            continue
        for i in range(n_layers):
            block = f"{prefix}.block.{i}.layer"
            attn = f"{block}.1.EncDecAttention" if stack == "cross" else f"{block}.0.SelfAttention"
            ffn = f"{block}.{1 if stack == 'encoder' else 2}.DenseReluDense"
            for kind in cfg.adapted:
                if kind in ATTN_KINDS:
                    out.append((f"{attn}.{kind}", stack, i, kind))
                elif stack != "cross":
                    name = f"{ffn}.{kind}"
                    if not _has(model, name):
                        raise ConfigError(
                            f"model.adapted: {kind!r} does not exist in this T5's FFN "
                            f"({model.config.feed_forward_proj}); gated FFNs have wi_0 wi_1 wo"
                        )
                    out.append((name, stack, i, kind))
    return out


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def body(model: T5ForConditionalGeneration) -> nn.Module:
    """The part that reads instructions: the encoder."""
    return model.get_encoder()


def encode(
    model: T5ForConditionalGeneration, input_ids: torch.Tensor, attention_mask: torch.Tensor, first_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encoder states ``[K, L, d]`` (final layer, normalised) and, if asked, the first layer's ``[K, L, d]``."""
    out = model.get_encoder()(
        input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=first_last, return_dict=True
    )
    return out.last_hidden_state, (out.hidden_states[1] if first_last else None)


def fuse(
    hidden: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor | None, prefix_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fusion-in-decoder: ``[prefix ; hidden]`` states ``[B, Li+L, d]`` and ``[prefix_mask ; mask]``."""
    if prefix is None:
        return hidden, mask
    return (torch.cat([prefix.to(hidden.dtype), hidden], dim=1), torch.cat([prefix_mask.to(mask.dtype), mask], dim=1))


def prefix_keys_values(
    model: T5ForConditionalGeneration, prefix: torch.Tensor, prefix_scope: Callable[[], AbstractContextManager]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every decoder layer's cross-attention keys and values of ``prefix [K, Li, d]`` (each task's instruction
    states), ``[K, H, Li, dk]`` each, projected under ``prefix_scope()`` (the adapters over the K task rows). The
    server keeps them with each instruction's adapter (``cross_cache(..., prefix_kv=)``)."""
    out = []
    for block in model.decoder.block:
        attn = block.layer[1].EncDecAttention
        dk = attn.key_value_proj_dim
        with prefix_scope():
            out.append((_heads(attn.k(prefix), dk), _heads(attn.v(prefix), dk)))
    return out


def _heads(x: torch.Tensor, dk: int) -> torch.Tensor:  # [n, S, H * dk] -> [n, H, S, dk]
    return x.view(x.shape[0], x.shape[1], -1, dk).transpose(1, 2)


def cross_cache(
    model: T5ForConditionalGeneration,
    hidden: torch.Tensor,
    prefix: torch.Tensor | None,
    rows: torch.Tensor,
    prefix_scope: Callable[[], AbstractContextManager] | None,
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> EncoderDecoderCache:
    """The decoder's cross-attention keys/values over ``[prefix ; hidden]``, filled in before decoding.

    ``prefix [K, Li, d]`` holds each task's instruction states once; ``rows [B]`` is each example's task.
    Without this cache the decoder projects the fused states ``[B, Li + L, d]`` of every example, so each
    task's instruction is projected once per example. Here every layer's k and v project each task's prefix
    once, under ``prefix_scope()`` (the adapters over the K task rows; ``prefix_kv``: those projections
    already made, :func:`prefix_keys_values`), and each example's ``hidden [B, L, d]`` under the caller's
    adapters; the prefix's keys/values are then gathered to the examples. An
    ``EncoderDecoderCache`` whose cross-attention layers are all filled makes HF's T5 reuse them instead of
    projecting ``encoder_hidden_states``: the logits are those of the uncached path (tested), with
    ``2 Li N_kv`` instead of ``2 B Li N_kv`` FLOPs for the instruction part.
    """
    cross = DynamicCache()
    if prefix_kv is None:
        prefix_kv = prefix_keys_values(model, prefix.to(hidden.dtype), prefix_scope)
    for i, (block, (pk, pv)) in enumerate(zip(model.decoder.block, prefix_kv, strict=True)):
        attn = block.layer[1].EncDecAttention
        dk = attn.key_value_proj_dim
        k = torch.cat([pk[rows].to(hidden.dtype), _heads(attn.k(hidden), dk)], dim=2)
        v = torch.cat([pv[rows].to(hidden.dtype), _heads(attn.v(hidden), dk)], dim=2)
        cross.update(k, v, i)
    return EncoderDecoderCache(DynamicCache(), cross)


def logits(
    model: T5ForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    prefix: torch.Tensor | None = None,
    prefix_mask: torch.Tensor | None = None,
    cache: Callable[[torch.Tensor], EncoderDecoderCache] | None = None,
) -> torch.Tensor:
    """Decoder logits ``[B, Lt, V]`` for ``labels``; with ``prefix`` ``[B, Li, d]`` the decoder cross-attends
    to ``[prefix ; encoder(input)]`` (TAGI's fusion), masked by ``[prefix_mask ; attention_mask]``.
    ``cache(encoder states) -> EncoderDecoderCache`` (:func:`cross_cache`) supplies those keys/values
    precomputed, so the decoder projects none of them."""
    hidden, _ = encode(model, input_ids, attention_mask)
    past = cache(hidden) if cache is not None else None
    hidden, mask = fuse(hidden, attention_mask, prefix, prefix_mask)
    out = model(
        encoder_outputs=(hidden,),
        attention_mask=mask,
        decoder_input_ids=model._shift_right(labels),
        use_cache=past is not None,
        return_dict=True,
        **{cache_kwarg(model): past},
    )
    return out.logits


def head_inputs(
    model: T5ForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    prefix: torch.Tensor | None = None,
    prefix_mask: torch.Tensor | None = None,
    cache=None,
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """What the training loss projects: here the decoder logits ``[B, Lt, V]`` themselves (T5 computes them at
    target positions only, in the weight dtype) and an identity ``head`` (see ``decoder.head_inputs``)."""
    return logits(model, input_ids, attention_mask, labels, prefix, prefix_mask, cache), _identity


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
