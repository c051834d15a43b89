"""What the planner counts: the micro-batch ``Shapes`` and the model's ``Counts`` (dimensions, adapted sites,
generator groups, parameter counts) taken from a recipe.

Parameter counts come from the recipe's shapes: the backbone and the whole TagiModel (sites, generator,
teacher bank) are built on the meta device, nothing is allocated. Tied embeddings count once; the elements of
tensors at most ``stage3_param_persistence_threshold`` long are counted apart (ZeRO-3 keeps them whole).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tagi_ds.config import TagiConfig


@dataclass
class Shapes:
    """One micro-batch per GPU: B examples of K tasks; lengths in tokens (T5: encoder input L, decoder Lt;
    LLaMA: prompt L + target Lt in one sequence). The teacher reads instruction + input."""

    micro_batch: int
    tasks: int
    seq_len: int
    target_len: int
    instr_len: int


@dataclass
class Counts:
    arch: str
    d: int
    d_ff: int
    heads: int
    kv_heads: int
    d_kv: int
    vocab: int
    enc_layers: int
    dec_layers: int
    gated: bool  # gated FFN (T5 gated-gelu: 3 matrices; LLaMA: always)
    fusion: bool
    rank: int
    teacher_rank: int
    hidden: int
    site_dim: int
    sites: list[tuple[str, int, str, int, int]]  # (stack, layer, kind, d_in, d_out)
    groups: list[tuple[int, int, int]]  # generator groups: (num sites, d_in, d_out)
    backbone: int
    backbone_persistent: int  # elements in tensors under the ZeRO-3 persistence threshold
    largest_module: int
    generator: int
    teacher: int
    teacher_rows: int
    modules: int = 0  # backbone modules (adapted-site wrappers included): ZeRO-3 hooks each one
    encoder_modules: int = 0  # T5: those the instruction encoding runs (the encoder); LLaMA: all but the LM head


def build_meta(cfg: TagiConfig, teacher_rows: int):
    """The whole TagiModel on the meta device (no memory), for counting."""
    from tagi_ds.model import build_backbone, build_model

    with torch.device("meta"):
        backbone = build_backbone(cfg)
        return build_model(cfg, "finetune", backbone, num_bank_rows=teacher_rows, with_teacher=teacher_rows > 0)


def count(cfg: TagiConfig, teacher_rows: int, persistence_threshold: int = 100_000) -> Counts:
    """Shapes and parameter counts of ``cfg``'s model in mode tagi (the baselines share its dims and sites)."""
    cfg = dataclasses.replace(cfg, mode="tagi")
    model = build_meta(cfg, teacher_rows)
    m = cfg.model
    unique = {id(p): p for p in model.backbone.parameters()}.values()  # tied embeddings count once
    largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in model.modules())
    groups = [(len(g), g[0].d_in, g[0].d_out) for g in model.generator.groups]
    return Counts(
        arch=m.arch, d=m.d_model, d_ff=m.d_ff, heads=m.num_heads,
        kv_heads=m.num_kv_heads if m.arch == "llama" else m.num_heads,
        d_kv=m.d_kv if m.arch == "t5" else m.d_model // m.num_heads, vocab=m.vocab_size,
        enc_layers=m.num_layers if m.arch == "t5" else 0,
        dec_layers=m.num_decoder_layers if m.arch == "t5" else m.num_layers,
        gated=m.arch == "llama" or m.feed_forward_proj.startswith("gated"),
        fusion=model.fusion, rank=cfg.hypernet.rank, teacher_rank=cfg.teacher.rank,
        hidden=cfg.hypernet.hidden, site_dim=cfg.hypernet.site_dim,
        sites=[(s.stack, s.layer, s.kind, s.d_in, s.d_out) for s in model.sites], groups=groups,
        backbone=sum(p.numel() for p in unique),
        backbone_persistent=sum(p.numel() for p in unique if p.numel() <= persistence_threshold),
        largest_module=largest,
        generator=sum(p.numel() for p in model.generator.parameters()),
        teacher=sum(p.numel() for p in model.teacher.parameters()) if model.teacher is not None else 0,
        teacher_rows=teacher_rows, modules=sum(1 for _ in model.backbone.modules()),
        encoder_modules=sum(1 for _ in model.arch.body(model.backbone).modules()))
