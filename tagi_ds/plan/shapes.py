"""What the planner counts: the micro-batch ``Shapes`` and the model's ``Counts`` (dimensions, adapted sites,
generator groups, parameter counts) taken from a recipe.

Parameter counts come from the recipe's shapes: the backbone and the whole TagiModel (sites, generator,
teacher bank) are built on the meta device, nothing is allocated. Tied embeddings count once; the elements of
tensors at most ``stage3_param_persistence_threshold`` long are counted apart (ZeRO-3 keeps them whole).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tagi_ds import families
from tagi_ds.config import TagiConfig


@dataclass
class Shapes:
    """One micro-batch per GPU: B examples of K tasks; lengths in tokens (T5: encoder input L, decoder Lt;
    decoder-only: prompt L + target Lt in one sequence). The teacher reads instruction + input."""

    micro_batch: int
    tasks: int
    seq_len: int
    target_len: int
    instr_len: int


@dataclass
class Counts:
    arch: str
    encoder_decoder: bool  # T5's layout (encoder over the input, decoder over the target); else decoder-only
    d: int
    d_ff: int
    heads: int
    kv_heads: int
    d_kv: int
    vocab: int
    enc_layers: int
    dec_layers: int
    gated: bool  # gated FFN (T5 gated-gelu: 3 matrices; decoder-only: always)
    eager: bool  # eager attention (scores [B, H, S, S] saved; Gemma-2's soft-capping needs it, or flash)
    softcap: bool  # attention logits soft-capped (Gemma-2): eager also saves the tanh of the scores
    layer_norms: int  # norms per decoder-only layer (2; Gemma-2: 4); unused for T5
    masks: int  # attention masks a decoder-only body builds: one per layer type (Gemma-2: sliding + full)
    fusion: bool
    rank: int
    teacher_rank: int
    hidden: int
    site_dim: int
    sites: list[tuple[str, int, str, int, int]]  # (stack, layer, kind, d_in, d_out)
    groups: list[tuple[int, int, int]]  # generator groups: (num sites, d_in, d_out)
    backbone: int
    vocab_params: int  # the input embedding + the LM head (once when tied)
    chunk: int  # loss.chunk_tokens: target tokens per chunk of the LM head + CE/KL
    backbone_persistent: int  # elements in tensors under the ZeRO-3 persistence threshold
    largest_module: int
    generator: int
    teacher: int
    teacher_rows: int
    modules: int = 0  # backbone modules (adapted-site wrappers included): ZeRO-3 hooks each one
    encoder_modules: int = 0  # T5: those the instruction encoding runs (the encoder); LLaMA: all but the LM head
    # --teacher_model (tagi_ds.teacher_model): the separate frozen teacher's counts; its forward replaces the
    # teacher-LoRA forward on this backbone, its weights are held (partitioned under ZeRO-3) beside the backbone
    teacher_model: Counts | None = None


def _layer_norms(backbone) -> int:
    """Norm modules in the first layer of a decoder-only body (0 for T5, whose formulas count its own)."""
    layers = getattr(getattr(backbone, "model", None), "layers", None)
    if layers is None:
        return 0
    return sum(1 for mod in layers[0].modules() if "norm" in type(mod).__name__.lower())


def build_meta(cfg: TagiConfig, teacher_rows: int):
    """The whole TagiModel on the meta device (no memory), for counting: a finetune run's (``tagi_ds.assembly``)."""
    from tagi_ds import assembly, stages

    return assembly.meta_model(cfg, stages.spec("finetune", cfg), {}, rows=teacher_rows, teacher=teacher_rows > 0)


def with_teacher_model(c: Counts, recipe: str | None, persistence_threshold: int = 100_000) -> Counts:
    """``c`` with the counts of a separate teacher model of ``recipe``'s shapes (None: ``c`` as it is)."""
    if recipe is None:
        return c
    from tagi_ds.recipes import get_recipe

    return dataclasses.replace(c, teacher_model=count(get_recipe(recipe), 0, persistence_threshold))


def count(cfg: TagiConfig, teacher_rows: int, persistence_threshold: int = 100_000) -> Counts:
    """Shapes and parameter counts of ``cfg``'s model in mode tagi (the baselines share its dims and sites)."""
    cfg = dataclasses.replace(cfg, mode="tagi")
    model = build_meta(cfg, teacher_rows)
    m, hf, fam = cfg.model, model.backbone.config, families.get(cfg.model.arch)
    unique = {id(p): p for p in model.backbone.parameters()}.values()  # tied embeddings count once
    vocab = {
        id(p): p
        for mod in (model.backbone.get_input_embeddings(), model.backbone.get_output_embeddings())
        for p in mod.parameters()
    }.values()
    largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in model.modules())
    groups = [(len(g), g[0].d_in, g[0].d_out) for g in model.generator.groups]
    return Counts(
        arch=m.arch,
        encoder_decoder=fam.encoder_decoder,
        d=m.d_model,
        d_ff=m.d_ff,
        heads=m.num_heads,
        kv_heads=getattr(hf, fam.hf_key("num_kv_heads", "num_heads")),  # no grouped-query attention: the heads
        d_kv=getattr(hf, fam.hf_key("head_dim", "d_kv")),
        vocab=m.vocab_size,
        enc_layers=m.num_layers if fam.encoder_decoder else 0,
        dec_layers=m.num_decoder_layers if fam.encoder_decoder else m.num_layers,
        # a family without a feed_forward_proj field has a gated FFN (SwiGLU / GeGLU)
        gated="feed_forward_proj" not in fam.shape or m.feed_forward_proj.startswith("gated"),
        eager=m.attn_implementation == "eager",
        softcap=bool(getattr(hf, "attn_logit_softcapping", None)),
        layer_norms=_layer_norms(model.backbone),
        masks=len(set(getattr(hf, "layer_types", None) or ["full_attention"])),
        fusion=model.fusion,
        rank=cfg.hypernet.rank,
        teacher_rank=cfg.teacher.rank,
        hidden=cfg.hypernet.hidden,
        site_dim=cfg.hypernet.site_dim,
        sites=[(s.stack, s.layer, s.kind, s.d_in, s.d_out) for s in model.sites],
        groups=groups,
        backbone=sum(p.numel() for p in unique),
        vocab_params=sum(p.numel() for p in vocab),
        chunk=cfg.loss.chunk_tokens,
        backbone_persistent=sum(p.numel() for p in unique if p.numel() <= persistence_threshold),
        largest_module=largest,
        generator=sum(p.numel() for p in model.generator.parameters()),
        teacher=sum(p.numel() for p in model.teacher.parameters()) if model.teacher is not None else 0,
        teacher_rows=teacher_rows,
        modules=sum(1 for _ in model.backbone.modules()),
        encoder_modules=sum(1 for _ in model.arch.body(model.backbone).modules()),
    )
