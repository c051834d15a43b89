"""FLOPs of one training step (``step_flops``, also used by the benchmarks) and the step-time estimate built on
them (``step_time``).

FLOPs per step (``step_flops``; N = backbone matmul parameters a token passes through):
frozen base 4N per token (forward 2N + input gradients 2N, no weight gradients); attention 4*Lk*H*dk per
query token per layer forward, x3 with backward (no causal discount); adapters 6*r*(d_in+d_out) per token
per site (forward 2 + backward 4); generator 3 x its forward (2 x matmul params) per task and site;
instruction encoding 2*N_enc per instruction token (forward only); teacher forward 2N per teacher token (when a
loss term reads the teacher view); each loss term's own ``Cost.flops`` (``tagi_ds.loss_terms``: alignment's Gram
matrices); gradient checkpointing recomputes the student's layers, and the chunked loss the LM head of each view
(hardware FLOPs only; MFU uses model FLOPs). Decoder-only training projects the LM head at target tokens only.
Checked against torch's FlopCounterMode on the tiny recipes (tests/plan/test_plan.py).

Step time: hardware FLOPs (``step_flops``) / ``--tflops_per_gpu``, and ZeRO-3's all-gathers of the backbone
(instruction encoding, student forward, teacher forward, backward; + recompute with checkpointing), plus the
hypernet's reduce-scatter and all-gather, over ``--interconnect_gbps`` (per GPU, between nodes) or
``--intra_node_gbps`` (one node); host <-> GPU copies (the batch's teacher rows from host memory, and with
offload the partitions and gradients) over ``--pcie_gbps``. step = max(compute, comm) + ZeRO-3 host time:
DeepSpeed's prefetch overlaps compute and communication (the no-overlap sum is reported too); a partitioned
backbone's module hooks (a fetch and a release around every module call, forward and backward) run on the host
between kernel launches and are added in full, ``zero3_hooks`` calls x ``--zero3_hook_us`` (none when the backbone
is replicated: ``--backbone``). MFU is against the H100 bf16 dense peak (989 TFLOP/s).
"""

from __future__ import annotations

from tagi_ds.plan.inputs import H100_BF16_DENSE_TFLOPS, PlanInput, stage2_terms, terms_of
from tagi_ds.plan.shapes import Counts, Shapes
from tagi_ds.stages import MODES

# ``step_flops``' variants: the mode whose step each counts (``lora``: one shared LoRA on the input alone).
VARIANTS = {"tagi": MODES["tagi"], "concat": MODES["concat"], "lora": MODES["no_instruction"]}


def _layer_params(c: Counts) -> dict[str, int]:
    inner, kv = c.heads * c.d_kv, c.kv_heads * c.d_kv
    ffn = (3 if c.gated else 2) * c.d * c.d_ff
    if c.encoder_decoder:
        # decoder: self-attention + cross q, o + FFN per target token; cross k, v per encoder token
        return {"enc": 4 * c.d * inner + ffn, "dec_q": 6 * c.d * inner + ffn, "dec_kv": 2 * c.d * inner}
    return {"dec_q": 2 * c.d * inner + 2 * c.d * kv + ffn}


def backbone_forward_flops(
    c: Counts,
    B: int,
    L: int,
    Lt: int,
    Lx: int | None = None,
    lm_head: bool = True,
    decoder: bool = True,
    head_tokens: int | None = None,
) -> dict[str, int]:
    """Forward FLOPs of the frozen backbone for B sequences: ``linear`` (2 x params per token) and ``attention``.
    T5: encoder over L tokens, decoder over Lt tokens cross-attending to Lx (default L) encoder states.
    Decoder-only: L + Lt tokens in one causal sequence (counted as full attention). ``head_tokens``: the tokens per
    sequence the LM head projects (default: T5 Lt, decoder-only all L + Lt; training projects only the Lt targets)."""
    lp, inner = _layer_params(c), c.heads * c.d_kv
    if c.encoder_decoder:
        Lx = L if Lx is None else Lx
        lin = 2 * B * L * c.enc_layers * lp["enc"]
        att = 4 * B * L * L * inner * c.enc_layers
        if decoder:
            lin += 2 * B * Lt * c.dec_layers * lp["dec_q"] + 2 * B * Lx * c.dec_layers * lp["dec_kv"]
            att += 4 * B * Lt * (Lt + Lx) * inner * c.dec_layers
            lin += 2 * B * (Lt if head_tokens is None else head_tokens) * c.d * c.vocab if lm_head else 0
        return {"linear": lin, "attention": att}
    S = L + Lt
    head = S if head_tokens is None else head_tokens
    lin = 2 * B * S * c.dec_layers * lp["dec_q"] + (2 * B * head * c.d * c.vocab if lm_head else 0)
    return {"linear": lin, "attention": 4 * B * S * S * inner * c.dec_layers}


def cross_kv_flops(c: Counts, tokens: int, rank: int = 0) -> int:
    """T5: forward FLOPs of every decoder layer's cross-attention k and v (+ their rank-``rank`` adapters)
    over ``tokens`` encoder states; 0 for LLaMA."""
    if not c.encoder_decoder:
        return 0
    return 2 * tokens * c.dec_layers * _layer_params(c)["dec_kv"] + adapter_flops(
        c, 1, 0, 0, tokens, rank, only_stacks=("cross",)
    )


def adapter_flops(c: Counts, B: int, L: int, Lt: int, Lx: int, rank: int, only_stacks=None) -> int:
    """Forward FLOPs of one LoRA delta per adapted site: 2 * tokens * r * (d_in + d_out)."""
    total = 0
    for stack, _, kind, d_in, d_out in c.sites:
        if only_stacks and stack not in only_stacks:
            continue
        if not c.encoder_decoder:
            T = B * (L + Lt)
        elif stack == "encoder":
            T = B * L
        elif stack == "cross" and kind in ("k", "v"):
            T = B * Lx
        else:
            T = B * Lt
        total += 2 * T * rank * (d_in + d_out)
    return total


def step_flops(
    c: Counts, s: Shapes, variant: str = "tagi", checkpointing: bool = False, terms=None
) -> dict[str, float]:
    """FLOPs of one micro-batch training step by component; ``model`` (for MFU) and ``hardware`` (+ recompute).
    Decoder-only: the LM head projects the Lt target tokens only, and once more per view in the loss's backward
    (``tagi_ds.losses.token_sums`` recomputes each chunk), which ``recompute`` counts.

    variant ``tagi``: student on the input (+ fused instruction states), instruction encoding, generator,
    teacher forward on instruction + input (when a term reads the teacher view); ``concat``: one shared LoRA on
    instruction + input; ``lora``: one shared LoRA on the input alone (the plain single-LoRA step).
    ``terms``: the loss terms on (``tagi_ds.loss_terms``; default: CE, KL, parameter alignment); each term with a
    ``Cost.flops`` gets its own entry under its name; the baselines read no teacher, so their terms that do are
    left out."""
    B, K, L, Lt, Li = s.micro_batch, s.tasks, s.seq_len, s.target_len, s.instr_len
    t5 = c.encoder_decoder
    m = VARIANTS[variant]
    terms = [t for t in stage2_terms(terms) if m.instruction or not t.teacher]  # a baseline reads no teacher
    view = any(t.teacher_view for t in terms)
    out: dict[str, float] = {}
    if m.instruction_in_input:
        L = L + Li
    Lx = L + Li if (m.instruction and t5 and c.fusion) else L
    head = None if t5 else Lt
    fwd = backbone_forward_flops(c, B, L, Lt, Lx, head_tokens=head)
    out["student_base"] = 2 * fwd["linear"]  # forward 2N + input gradients 2N per token
    out["student_attention"] = 3 * fwd["attention"]
    adapters = adapter_flops(c, B, L, Lt, Lx, c.rank)
    out["adapters"] = 3 * adapters
    if m.instruction:  # the hypernetwork's step: instruction encoding, generator, the teacher
        enc = (
            backbone_forward_flops(c, K, Li, 0, decoder=False)
            if t5
            else backbone_forward_flops(c, K, Li, 0, lm_head=False)
        )
        out["instruction_encoding"] = enc["linear"] + enc["attention"]
        per_task = 2 * sum(
            n * ((c.d + c.site_dim) * c.hidden + c.hidden * c.hidden + c.hidden * c.rank * (di + do))
            for n, di, do in c.groups
        )
        out["generator"] = 3 * K * per_task
        if view and c.teacher_model is not None:  # the separate teacher model on instruction + input, no adapters
            tf = backbone_forward_flops(c.teacher_model, B, Li + L, Lt, head_tokens=head)
            out["teacher_forward"] = tf["linear"] + tf["attention"]
        elif view:
            tf = backbone_forward_flops(c, B, Li + L, Lt, head_tokens=head)
            out["teacher_forward"] = (
                tf["linear"] + tf["attention"] + adapter_flops(c, B, Li + L, Lt, Li + L, c.teacher_rank)
            )
    for t in terms:
        if t.cost.flops is not None:
            out[t.name] = t.cost.flops(c, s)
    out["model"] = sum(out.values())
    # Decoder-only: each view's LM head once more in the loss's backward (the teacher's own head with a teacher model).
    teacher_d = (c.teacher_model or c).d if view else 0
    recompute = 0.0 if t5 else 2.0 * B * Lt * (c.d + teacher_d) * c.vocab
    if checkpointing:
        blocks = backbone_forward_flops(c, B, L, Lt, Lx, lm_head=False)
        recompute += blocks["linear"] + blocks["attention"] + adapters
    out["recompute"] = recompute
    out["hardware"] = out["model"] + recompute
    return out


def zero3_hook_calls(c: Counts, teacher_view: bool = True, checkpointing: bool = False) -> int:
    """Module calls of one TAGI step that ZeRO-3 hooks when it owns the backbone: instruction encoding (T5: the
    encoder's modules), student forward, teacher forward (``teacher_view``), backward (+ the recompute with
    checkpointing)."""
    return c.encoder_modules + c.modules * (1 + int(teacher_view) + 1 + int(checkpointing))


def step_time(p: PlanInput, c: Counts, s: Shapes) -> dict[str, float]:
    terms = terms_of(p)
    view, teacher = any(t.teacher_view for t in terms), any(t.teacher for t in terms)
    flops = step_flops(c, s, "tagi", p.gradient_checkpointing, terms)
    compute = flops["hardware"] / (p.tflops_per_gpu * 1e12)
    W, wb = p.world, (2 if p.precision == "bf16" else 4)
    # Backbone passes that gather the weights: instruction encoding (T5: the encoder only), student forward,
    # teacher forward, backward, and the recompute with checkpointing.
    enc_share = c.enc_layers / (c.enc_layers + c.dec_layers) if c.encoder_decoder else 1.0
    tm = c.teacher_model if view else None
    passes = enc_share + 1 + (1 if view and tm is None else 0) + 1 + (1 if p.gradient_checkpointing else 0)
    weights = passes * c.backbone * wb
    parted = p.stage == "z3" and p.backbone != "replicated"
    # A separate teacher model: one gathered forward per step, partitioned under ZeRO-3 whatever the backbone's
    # placement (tagi_ds.teacher_model.build).
    teacher_w = tm.backbone * wb if tm is not None and p.stage == "z3" else 0
    network = (weights if parted else 0) + teacher_w + 2 * c.generator * wb  # + hypernet reduce-scatter, all-gather
    network = network * (W - 1) / W
    pcie = (weights + teacher_w) / W if p.offload == "param" else 0  # each rank fetches its partitions from host
    pcie += 2 * c.generator * wb / W if p.offload != "none" else 0  # gradients down, updated weights up
    if teacher and c.teacher_rows:  # the batch's rows of the host-resident teacher bank, fp32
        pcie += min(s.tasks, c.teacher_rows) * c.teacher / c.teacher_rows * 4
    bw = (p.interconnect_gbps if p.nodes > 1 else p.intra_node_gbps) * 1e9 / 8
    comm = network / bw + pcie / (p.pcie_gbps * 1e9 / 8)
    hooks = zero3_hook_calls(c, view and tm is None, p.gradient_checkpointing) if parted else 0
    hooks += tm.modules if tm is not None and p.stage == "z3" else 0  # the teacher model's forward
    host = hooks * (p.zero3_hook_us or 0.0) * 1e-6
    step = max(compute, comm) + host
    tokens = s.micro_batch * (s.seq_len + s.target_len)
    return {
        "compute_s": compute,
        "comm_s": comm,
        "zero3_hooks": hooks,
        "zero3_host_s": host,
        "step_s": step,
        "step_no_overlap_s": compute + comm + host,
        "network_bytes": network,
        "pcie_bytes": pcie,
        "hardware_flops": flops["hardware"],
        "model_flops": flops["model"],
        "tokens_per_s_per_gpu": tokens / step,
        "tokens_per_s": tokens * W / step,
        "mfu": flops["model"] / step / (H100_BF16_DENSE_TFLOPS * 1e12),
    }
