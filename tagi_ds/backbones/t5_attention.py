"""T5 under SDPA with its position bias merged into the padding mask once per forward, not once per layer.

transformers' SDPA path for T5 (``integrations/sdpa_attention.py``: ``create_position_bias_mask``) turns the position
bias ``[1, H, Lq, Lk]`` and the boolean mask ``[B, 1, Lq, Lk]`` into one additive float mask ``[B, H, Lq, Lk]`` with a
``torch.where`` in every layer, and SDPA's backward keeps every layer's copy. All layers of a stack get the same
position bias tensor (the first layer computes it) and the same mask, so here the merged mask is made once and kept
on the position bias tensor itself, which lives exactly as long as the forward that uses it: one ``where`` and one
saved ``[B, H, Lq, Lk]`` per stack instead of one per layer. Values are those of transformers' ``sdpa`` (tested).

The boolean masks are also built without transformers' "no padding at all?" check (``allow_is_bidirectional_skip``):
it reads the mask back from the device (a sync in every forward) to drop the mask, which never helps T5, whose
position bias needs a float mask anyway.

Registered with transformers' documented extension points (``AttentionInterface``, ``AttentionMaskInterface``) under
``NAME``; ``implementation("sdpa")`` returns it (what ``model.config._attn_implementation`` then says).
"""

from __future__ import annotations

import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import create_position_bias_mask, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

NAME = "tagi_t5_sdpa"


def implementation(requested: str) -> str:
    """The attention implementation to build a T5 with: ``NAME`` for ``sdpa``, anything else as requested."""
    return NAME if requested == "sdpa" else requested


def _merged(
    position_bias: torch.Tensor,
    attention_mask: torch.Tensor | None,
    is_causal: bool,
    query: torch.Tensor,
    key: torch.Tensor,
) -> torch.Tensor:
    """``create_position_bias_mask``, made once per (position bias, mask, causality, shapes) and kept on the bias.

    A merged mask without autograd history is held strongly (it dies with the bias). One with history (a trainable
    bias) is held weakly: a strong one would close a cycle through the autograd graph (bias -> mask -> its grad_fn
    -> the bias's AccumulateGrad) that Python's collector cannot see; SDPA's saved tensors keep it alive in
    training, and without them each layer merges again, as transformers does."""
    cache = position_bias.__dict__.setdefault("_tagi_merged_masks", {})
    k = (id(attention_mask), is_causal, key.dtype, query.shape[2], key.shape[2])
    versions = (position_bias._version, None if attention_mask is None else attention_mask._version)
    hit = cache.get(k)
    if hit is not None and hit[0]() is attention_mask and hit[1] == versions:
        merged = hit[2]() if isinstance(hit[2], weakref.ref) else hit[2]
        if merged is not None:
            return merged
    merged = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
    ref = weakref.ref(attention_mask) if attention_mask is not None else (lambda: None)
    cache[k] = (ref, versions, weakref.ref(merged) if merged.grad_fn is not None else merged)
    return merged


def t5_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
):
    """transformers' ``sdpa_attention_forward`` with the merged mask of ``_merged`` (same causality rules)."""
    if position_bias is not None:
        q_len, kv_len = query.shape[2], key.shape[2]
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = q_len > 1 and attention_mask is None and causal
        if not (causal and kv_len > q_len):  # that case (prefill after a cache) crops first: left to transformers
            attention_mask = _merged(position_bias, attention_mask, causal, query, key)
            position_bias, is_causal = None, False
    return sdpa_attention_forward(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        position_bias=position_bias,
        **kwargs,
    )


def t5_sdpa_mask(*args, **kwargs):
    """``sdpa_mask`` that always builds the boolean mask (no device read to find out whether it can be dropped)."""
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(NAME, t5_sdpa_attention)
AttentionMaskInterface.register(NAME, t5_sdpa_mask)
assert NAME in ALL_MASK_ATTENTION_FUNCTIONS
