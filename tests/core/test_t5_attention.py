"""T5's SDPA with the position bias merged into the mask once per stack (tagi_ds/backbones/t5_attention.py): the
logits, gradients and generated tokens of transformers' own ``sdpa``, with one ``where`` per stack instead of one per
layer and no read of the padding mask."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import T5ForConditionalGeneration

from tagi_ds.backbones import t5_attention
from tagi_ds.model import build_backbone
from tagi_ds.recipes import get_recipe


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _pair(layers: int = 3):
    cfg = get_recipe("tiny")
    cfg.model.num_layers = cfg.model.num_decoder_layers = layers
    ours = build_backbone(cfg)
    theirs = T5ForConditionalGeneration._from_config(copy.deepcopy(ours.config), attn_implementation="sdpa")
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 1024, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    labels = torch.randint(4, 1024, (3, 5), generator=g)
    return ids, mask, labels


def test_same_logits_and_gradients_as_transformers_sdpa_with_one_merge_per_stack():
    ours, theirs = _pair()
    assert ours.config._attn_implementation == t5_attention.NAME and theirs.config._attn_implementation == "sdpa"
    ids, mask, labels = _batch()
    wheres = []
    for model in (ours, theirs):  # as in training: a frozen bias (gradients flow to the embeddings only)
        model.requires_grad_(False).shared.weight.requires_grad_(True)
        with CountOps() as ops:
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
        wheres.append(ops.counts.get("where", 0))
        out.loss.backward()  # SDPA's backward through the shared mask
    torch.testing.assert_close(ours.shared.weight.grad, theirs.shared.weight.grad)
    # transformers merges in every layer of each stack (encoder self, decoder self, cross): 3 x 3 here; ours once
    # per stack (3), beside the 2 wheres of the position buckets.
    assert wheres[1] >= 9 and wheres[0] <= wheres[1] - 6, wheres
    results = []
    for model in (ours, theirs):  # trainable: the same logits and every gradient, the bias's included
        model.zero_grad()
        model.requires_grad_(True)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        results.append((out.logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (lo, go), (lt, gt) = results
    torch.testing.assert_close(lo, lt)
    assert go.keys() == gt.keys() and any("relative_attention_bias" in n for n in go)
    for n in go:
        torch.testing.assert_close(go[n], gt[n], msg=n)


@pytest.mark.parametrize("padded", [True, False])
def test_greedy_generation_with_a_cache_is_unchanged(padded):
    ours, theirs = _pair(layers=2)
    ids, mask, _ = _batch()
    if not padded:
        mask = torch.ones_like(mask)
    with torch.no_grad():
        a = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        b = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


def test_only_sdpa_is_replaced():
    assert t5_attention.implementation("sdpa") == t5_attention.NAME
    assert t5_attention.implementation("eager") == "eager"
