"""Per-GPU memory of one stage-2 step: the activation formulas (``saved_layer``, ``activations``) and the
per-part bytes (``memory``). Per GPU, in bytes:

- backbone: frozen, in the weight dtype; ZeRO-3 partitions it over all ranks (tensors of at most
  ``stage3_param_persistence_threshold`` elements stay whole), ZeRO-2, ``none`` and ZeRO-3 with ``--backbone
  replicated`` keep it whole; ``--offload param`` moves the partitions to pinned CPU memory.
- the teacher bank is not on the GPU: it stays whole in (pinned) host memory on every rank, fp32, outside
  DeepSpeed (``TagiModel.teacher``); a step copies only its batch's rows, which ``activations`` counts.
  ``host_memory`` gives its host bytes per rank.
- hypernet: the generator's weights, whole on every rank (``train.engine.keep_whole``).
- gradients (generator only): ``none`` keeps them whole in the weight dtype; ZeRO-2/3 reduce-scatter them
  into a 1/W partition, plus the fp32 copy the optimizer step makes in bf16.
- optimizer: AdamW m and v + DeepSpeed's fp32 flat copy of the trainable weights, 1/W each under ZeRO; CPU
  under ``--offload optimizer`` or ``param``. ``none`` (one process, plain torch AdamW): m and v in the weight
  dtype, no copy.
- activations: tensors autograd saves in the student forward, counted per layer from the shapes (formulas in
  ``saved_layer``), plus what the step holds in scope (instruction states, the final hidden states at the
  target tokens that the loss projects).
- transient: the largest working set on top of the activations, over the phases after the student forward:
  the student's final hidden states (T5: logits) before the target rows are picked, the teacher's no-grad forward
  (one layer at the teacher's length), the LM head + CE/KL one chunk of ``loss.chunk_tokens`` target tokens at
  a time (``loss_working_set``; never ``[B, L, V]``), the backward start (the chunks recomputed; with gradient
  checkpointing: the recomputed block). ``vocab`` in ``plan``'s result shows the vocabulary's share.
- gather: ZeRO-3's gathered working set: the largest module + one prefetch bucket (none when the backbone is
  replicated: nothing partitioned is gathered then, the hypernetwork is kept whole); comm buffers:
  DeepSpeed's reduce (and all-gather) bucket.
  Bucket sizes are read from the DeepSpeed JSON (``ds_configs/z3.json`` / ``z2.json`` or ``--deepspeed``).

``total`` is the peak of allocated tensor bytes (what ``torch.cuda.max_memory_allocated`` reports): the
static parts + the largest phase (activations + transient; without DeepSpeed the gradients only join at
the generator's backward, the last one, so ``total`` is not the plain sum of the rows). It fits when
``total <= 0.92 * gpu_mem - 1 GiB`` (``usable_bytes``: CUDA context, NCCL buffers, allocator fragmentation);
``--gpu_mem_gb`` is in GiB.
``--teacher_rows 0`` plans a step without teacher (no KL, no param-MSE). The loss terms a plan counts are the
registered ones on (``tagi_ds.loss_terms``; ``PlanInput.terms``): their chunk temporaries, what they save, and
whether a teacher view is run.
"""

from __future__ import annotations

import math
from typing import Any

from tagi_ds.plan.inputs import GiB, PlanInput, stage2_terms, terms_of
from tagi_ds.plan.shapes import Counts, Shapes


def _norm(c: Counts, T: int, b: int) -> int:
    """RMSNorm saved for backward: the fp32 input (the pow's), rsqrt [T, 1]; T5 also keeps the bf16 input."""
    extra = T * c.d * b if (c.encoder_decoder and b < 4) else 0
    return T * c.d * 4 + T * 4 + extra


def _site(c: Counts, T: int, d_in: int, b: int) -> int:
    """lora_delta_torch: gathered x [T, d_in], x A^T [T, r], the validity mask (x dtype), int64 indices, bool mask."""
    return T * (d_in * b + c.rank * b + b + 8 + 1)


def _attn(c: Counts, Tq: int, Tk: int, mask: int, b: int, scores: int = 0) -> int:
    """SDPA saves q, k, v, out, the fp32 logsumexp and the additive mask it was given. Eager attention (decoder-only,
    ``scores`` = B*H*Lq*Lk) saves k and v repeated to every query head, the fp32 softmax and its copy in the weight
    dtype (bf16), and with soft-capping (Gemma-2) the tanh of the scores, but not the mask."""
    if c.eager and not c.encoder_decoder:
        kv = 2 * Tk * c.heads * c.d_kv * b
        probs = scores * (4 + (b if b < 4 else 0) + (b if c.softcap else 0))
        return 2 * Tq * c.heads * c.d_kv * b + kv + probs  # the additive mask is not saved
    return (2 * Tq * c.heads + 2 * Tk * c.kv_heads) * c.d_kv * b + Tq * c.heads * 4 + mask


def _ffn(c: Counts, T: int, b: int) -> int:
    """T5 gated-gelu (tanh GELU): 4 tensors in the GELU + both product inputs; relu: its output; decoder-only gated
    FFN (SwiGLU, Gemma-2's fused tanh GELU): the activation's input and both product inputs."""
    if not c.encoder_decoder:
        return 3 * T * c.d_ff * b
    return (6 if c.gated else 1) * T * c.d_ff * b


def _sites_of(c: Counts, stack: str, tokens: dict[str, int], b: int) -> int:
    """Saved bytes of one layer's adapted sites of ``stack`` (tokens per kind of input; every layer has the same)."""
    return sum(
        _site(c, tokens["kv"] if (stack == "cross" and kind in ("k", "v")) else tokens["q"], d_in, b)
        for st, layer, kind, d_in, _ in c.sites
        if st == stack and layer == 0
    )


def saved_layer(c: Counts, s: Shapes, b: int) -> dict[str, int]:
    """Saved bytes of one student layer of each kind (the first layer of a stack saves no input norm)."""
    B, L, Lt, Li = s.micro_batch, s.seq_len, s.target_len, s.instr_len
    if c.encoder_decoder:
        Te, Td = B * L, B * Lt
        Lx = Li + L if c.fusion else L
        Tx = B * Lx
        enc = 2 * _norm(c, Te, b) + _sites_of(c, "encoder", {"q": Te}, b) + _attn(c, Te, Te, 0, b) + _ffn(c, Te, b)
        dec = (
            3 * _norm(c, Td, b)
            + _sites_of(c, "decoder", {"q": Td}, b)
            + _sites_of(c, "cross", {"q": Td, "kv": Tx}, b)
            + _attn(c, Td, Td, 0, b)
            + _attn(c, Td, Tx, 0, b)
            + _ffn(c, Td, b)
        )
        # The additive masks (position bias merged with padding) are made once per stack and shared by its layers
        # (tagi_ds/backbones/t5_attention.py): encoder self, decoder self (causal only: no batch dimension), cross.
        masks = c.heads * (B * L * L + Lt * Lt + B * Lt * Lx) * b
        return {
            "encoder": enc,
            "decoder": dec,
            "enc_input_norm": _norm(c, Te, b),
            "dec_input_norm": _norm(c, Td, b),
            "masks": masks,
        }
    T, S = B * (L + Lt), L + Lt
    dec = (
        c.layer_norms * _norm(c, T, b)
        + _sites_of(c, "decoder", {"q": T}, b)
        + _attn(c, T, T, B * S * S * b, b, B * c.heads * S * S)
        + _ffn(c, T, b)
    )
    return {"encoder": 0, "decoder": dec, "enc_input_norm": 0, "dec_input_norm": _norm(c, T, b), "masks": 0}


def loss_working_set(c: Counts, s: Shapes, b: int, terms=None) -> dict[str, int]:
    """The LM head + CE/KL of ``tagi_ds.losses.token_sums`` (bytes): ``rows``, what it keeps per view (the
    final hidden states at the N = B*Lt target tokens, ``[N, d]``; T5: the logits there, ``[N, V]``), and the
    peak of one chunk of ``c.chunk`` target tokens in forward (``chunk_forward``) and in its recomputed backward
    (``chunk_backward``). Counted in fp32 units of ``[chunk, V]`` (measured with ``TensorBytesTracker``): the
    head's logits, the log-softmax of CE, with the KL the teacher's logits, probabilities and log-probabilities
    and the student's tempered log-softmax, and in backward their gradients: each token term's ``Cost.chunk``
    (``tagi_ds.loss_terms``), summed over the terms on (``terms``; default CE, KL, alignment). In bf16 each view's
    logits also get their fp32 copy. ``full_logits_fp32`` is what one fp32 ``[B, L, V]`` of the student's sequence
    would take."""
    t5 = c.encoder_decoder
    terms = [t for t in stage2_terms(terms) if t.kind == "token"]
    N, V = s.micro_batch * s.target_len, c.vocab
    unit = min(c.chunk, N) * V * 4
    views = 2 if any(t.teacher_view for t in terms) else 1
    extra = views * min(c.chunk, N) * V * (4 if t5 else b) if b < 4 else 0
    fwd, bwd = (sum(t.cost.chunk[int(t5)][i] for t in terms) for i in (0, 1))
    rows = N * (V if t5 else c.d) * b
    length = s.target_len if t5 else s.seq_len + s.target_len
    return {
        "rows": rows,
        "chunk_forward": fwd * unit + extra,
        "chunk_backward": bwd * unit + extra,
        "full_logits_fp32": s.micro_batch * length * V * 4,
    }


def activations(c: Counts, s: Shapes, b: int, checkpointing: bool, terms=None) -> dict[str, int]:
    """Saved activations, in-scope tensors and the transient peak of one stage-2 step (bytes), with the loss terms
    ``terms`` on (``tagi_ds.loss_terms``; default CE, KL, alignment)."""
    terms = stage2_terms(terms)
    view = any(t.teacher_view for t in terms)
    B, K, L, Lt, Li, V, d = s.micro_batch, s.tasks, s.seq_len, s.target_len, s.instr_len, c.vocab, c.d
    lay = saved_layer(c, s, b)
    n_e, n_d = c.enc_layers, c.dec_layers
    t5 = c.encoder_decoder
    S_student = L + Lt if not t5 else L
    Lx = Li + L if (t5 and c.fusion) else L
    # Generator: LayerNorm input, trunk input, 2 GELU inputs, 2 hidden outputs; generated A, B (the sites save them).
    gen = K * d * b + sum(K * n * ((d + c.site_dim) * b + 4 * c.hidden * b) for n, _, _ in c.groups)
    factors = sum(K * c.rank * (di + do) * b for _, _, _, di, do in c.sites)
    # what the loss terms save for their backward (alignment: the teacher's factors of the batch's tasks)
    teacher_factors = sum(t.cost.saved(c, s, b) for t in terms if t.cost.saved is not None)
    final_norms = (_norm(c, B * L, b) + _norm(c, B * Lt, b)) if t5 else _norm(c, B * S_student, b)
    if checkpointing:
        # Per block only its input stays; masks, position bias and the fused encoder states once per stack.
        layers = (n_e * B * L + n_d * B * Lt) * d * b if t5 else n_d * B * S_student * d * b
        if t5:  # bool padding mask, position biases, the fused encoder states, the stacks' merged masks
            layers += B * L * L + c.heads * (L * L + Lt * Lt) * b + B * Lx * d * b + lay["masks"]
        else:
            layers += c.masks * B * S_student**2
    else:
        layers = (
            n_e * lay["encoder"] + n_d * lay["decoder"] - lay["enc_input_norm"] - lay["dec_input_norm"] + lay["masks"]
        )
    saved = layers + final_norms + gen + factors + teacher_factors
    lw = loss_working_set(c, s, b, terms)
    rows, rows_t = lw["rows"], (lw["rows"] if view else 0)
    scope = K * Li * d * b + rows  # instruction states; the student's target rows (kept for the loss)
    # What the head's input is before its target rows are picked: T5's logits [B, Lt, V]; else the hidden states.
    head_in = B * Lt * V * b if t5 else B * S_student * d * b
    phases = {
        "student_head": saved + scope + head_in,
        # a separate teacher model's forward has its own widths (c.teacher_model)
        "teacher_forward": saved + scope + (_teacher_working_set(c.teacher_model or c, s, b) + rows_t if view else 0),
        "loss": saved + scope + rows_t + lw["chunk_forward"],
        # The chunks recomputed with their gradients, then the rows' gradient scattered back to [B, L, *].
        "backward": saved + max(scope + rows_t + lw["chunk_backward"] + rows, rows + 2 * head_in),
    }
    # The last block's backward temporaries (block input / output grads, FFN grads); with checkpointing on top of
    # that block recomputed.
    Tm = B * (max(L, Lt) if t5 else S_student)
    block = (max(lay["encoder"], lay["decoder"]) if checkpointing else 0) + 2 * Tm * (d + c.d_ff) * b
    phases["backward"] = max(phases["backward"], saved + block)
    peak = max(phases.values())
    # The generator's backward comes last (it ran first): the backbone's activations are gone by then; what it
    # saved and the generated factors, with their gradients, are what the generator's gradients join.
    generator_backward = 2 * (gen + factors + teacher_factors) + scope
    return {
        "saved": saved,
        "scope": scope,
        "peak": peak,
        "transient": peak - saved - scope,
        **phases,
        "generator_backward": generator_backward,
        "loss_rows": rows + rows_t,
        "loss_chunk": max(lw["chunk_forward"], lw["chunk_backward"]),
        "full_logits_fp32": lw["full_logits_fp32"],
        "per_layer_enc": lay["encoder"],
        "per_layer_dec": lay["decoder"],
    }


def _teacher_working_set(c: Counts, s: Shapes, b: int) -> int:
    """Peak of the teacher's no-grad forward (instruction + input) at one layer, plus what its stack holds."""
    B, L, Lt, Li, d, f = s.micro_batch, s.seq_len, s.target_len, s.instr_len, c.d, c.d_ff
    H, inner, kv = c.heads, c.heads * c.d_kv, c.kv_heads * c.d_kv
    if c.encoder_decoder:
        Lk = Li + L
        Tt = B * Lk
        stack = H * Lk * Lk * b + B * Lk * Lk + B * H * Lk * Lk * b  # position bias, bool mask, merged (t5_attention)
        attn = Tt * (2 * d + 4 * inner) * b + B * H * Lk * Lk * b  # h, normed, q k v out; SDPA's copy of the mask
        ffn = Tt * 2 * d * b + 4 * Tt * f * b  # h, normed, wi_0 out + 3 GELU temporaries
        enc = stack + max(attn, ffn)
        Td = B * Lt
        dec = Tt * d * b + Td * (2 * d + 4 * inner) * b + 2 * Tt * inner * b + 2 * B * H * Lt * Lk * b
        return max(enc, dec, B * Lt * (c.vocab + d) * b)  # the logits and the last hidden states
    S = Li + L + Lt
    T = B * S
    attn = T * (2 * d + 2 * inner + 2 * kv) * b + T * d * 4 + c.masks * B * S * S * b  # h, normed, q k v + roped, norm
    # One adapted projection's temporaries on top: the gathered input, x A^T, the delta and base + delta.
    attn += max((T * (di + c.teacher_rank + 2 * do) * b for st, layer, _, di, do in c.sites if layer == 0), default=0)
    if c.eager:  # the scores, their fp32 softmax and its copy
        attn += B * H * S * S * (b + 4 + (b if b < 4 else 0))
    mlp = T * 2 * d * b + 3 * T * f * b
    return max(attn, mlp, T * d * b)  # the final hidden states (only the target rows are kept)


def memory(p: PlanInput, c: Counts, s: Shapes, zero: dict[str, Any]) -> dict[str, int]:
    """Per-GPU bytes of each part (see the module docstring) and their sum, ``total``."""
    W, wb = p.world, (2 if p.precision == "bf16" else 4)
    z3, ds = p.stage == "z3", p.stage != "none"
    part = lambda n: math.ceil(n / W)  # noqa: E731
    offp, offo = p.offload == "param", p.offload in ("optimizer", "param")
    parted = z3 and p.backbone != "replicated"  # "auto" counts as partitioned here; fit.fits tries both
    if parted:
        bb = 0 if offp else (part(c.backbone - c.backbone_persistent) + c.backbone_persistent) * wb
    else:
        bb = c.backbone * wb
    G = c.generator
    if not ds:
        grads, opt = G * wb, 2 * G * wb
    else:
        grads = 0 if offo else part(G) * (wb + (4 if wb == 2 else 0))
        opt = 0 if offo else part(G) * (4 + 8)  # DeepSpeed keeps an fp32 flat copy even when training in fp32
    terms = terms_of(p)
    act = activations(c, s, wb, p.gradient_checkpointing, terms)
    # A separate teacher model (--teacher_model): built like the backbone, so under ZeRO-3 partitioned whatever the
    # backbone's placement (tagi_ds.teacher_model.build), its 1/W share held throughout; whole below ZeRO-3.
    tm = c.teacher_model if any(t.teacher_view for t in terms) else None
    teacher = 0
    if tm is not None:
        teacher = (
            (0 if offp else (part(tm.backbone - tm.backbone_persistent) + tm.backbone_persistent) * wb)
            if z3
            else tm.backbone * wb
        )
    gather = 0
    if parted or (z3 and tm is not None):
        prefetch = int(zero.get("stage3_prefetch_bucket_size", 50_000_000))
        largest = max(c.largest_module if parted else 0, tm.largest_module if tm is not None else 0)
        live = min(
            int(zero.get("stage3_max_live_parameters", 1_000_000_000)),
            largest + prefetch,
            (c.backbone if parted else 0) + c.generator + (tm.backbone if tm is not None else 0),
        )
        gather = live * wb
    buffers = 0
    if ds:
        buffers = int(zero.get("reduce_bucket_size", 500_000_000)) * wb
        if not z3:
            buffers += min(int(zero.get("allgather_bucket_size", 500_000_000)), G) * wb
    out = {
        "backbone": bb,
        "teacher_model": teacher,
        "hypernet": G * wb,
        "gradients": grads,
        "optimizer": opt,
        "activations": act["saved"] + act["scope"],
        "transient": act["transient"],
        "zero3_gather": gather,
        "comm_buffers": buffers,
    }
    # Without DeepSpeed the gradients exist only from the generator's backward on (the last one: the forward peaks
    # and the backbone's backward do not see them), and the AdamW step adds one parameter-sized temporary;
    # DeepSpeed's partitions are allocated throughout.
    static = bb + teacher + G * wb + opt + gather + buffers + (grads if ds else 0)
    dynamic = act["peak"]
    if not ds:
        dynamic = max(dynamic, act["generator_backward"] + grads, grads + G * wb)
    out["total"] = static + dynamic
    return out


def host_memory(p: PlanInput, c: Counts) -> dict[str, int]:
    """Host bytes per rank that the GPU table leaves out: the whole fp32 teacher bank (when there is one)."""
    return {"teacher_bank": c.teacher * 4 if any(t.teacher for t in terms_of(p)) else 0}


def usable_bytes(gpu_mem_gb: float) -> int:
    return int(0.92 * gpu_mem_gb * GiB - GiB)
