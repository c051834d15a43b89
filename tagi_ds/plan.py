"""Memory and step-time planner for stage-2 TAGI training (finetune, mode tagi, teacher KL + param-MSE).

    python -m tagi_ds.plan --model t5-xxl --nodes 4 --gpus_per_node 8 --gpu_mem_gb 80
    python -m tagi_ds.plan --model llama-13b --gpu_mem_gb 24 --stage z2 --json
    python -m tagi_ds.plan --model tiny --stage none --measure      # predicted vs measured, this machine

Parameter counts come from the recipe's shapes: the backbone and the whole TagiModel (sites, generator,
teacher bank) are built on the meta device, nothing is allocated. Per GPU, in bytes:

- backbone / teacher bank: frozen, in the weight dtype; ZeRO-3 partitions them over all ranks (tensors of
  at most ``stage3_param_persistence_threshold`` elements stay whole), ZeRO-2 and ``none`` keep them whole;
  ``--offload param`` moves the partitions to pinned CPU memory.
- hypernet: the generator's weights, whole on every rank (``train.engine.keep_whole``).
- gradients (generator only): ``none`` keeps them whole in the weight dtype; ZeRO-2/3 reduce-scatter them
  into a 1/W partition, plus the fp32 copy the optimizer step makes in bf16.
- optimizer: AdamW m and v + DeepSpeed's fp32 flat copy of the trainable weights, 1/W each under ZeRO; CPU
  under ``--offload optimizer`` or ``param``. ``none`` (one process, plain torch AdamW): m and v in the weight
  dtype, no copy.
- activations: tensors autograd saves in the student forward, counted per layer from the shapes (formulas in
  ``saved_layer``), plus what the step holds in scope (instruction states, logits).
- transient: the largest working set on top of the activations, over the phases after the student forward:
  the teacher's no-grad forward (one layer at the teacher's length), the KL over the vocabulary, the backward
  start (with gradient checkpointing: the recomputed block).
- gather: ZeRO-3's gathered working set: the largest module + one prefetch bucket (the teacher bank is one
  module: gathered whole while its rows are read); comm buffers: DeepSpeed's reduce (and all-gather) bucket.
  Bucket sizes are read from the DeepSpeed JSON (``ds_configs/z3.json`` / ``z2.json`` or ``--deepspeed``).

``total`` is the peak of allocated tensor bytes (what ``torch.cuda.max_memory_allocated`` reports): the
static parts + the largest phase (activations + transient; without DeepSpeed the gradients only join from
the backward on, so ``total`` is not the plain sum of the rows). It fits when ``total <= 0.92 * gpu_mem -
1 GiB`` (CUDA context, NCCL buffers, allocator fragmentation); ``--gpu_mem_gb`` is in GiB. ``--teacher_rows
0`` plans a step without teacher (no KL, no param-MSE).

What has been checked: the fp32 path against ``measure_step`` on CPU (tests/test_plan.py: tiny T5 and LLaMA,
checkpointing on and off, within a few percent), and ``step_flops`` against torch's FlopCounterMode. The bf16
specifics (T5's extra fp32 norm input, bf16 logits), the GPU attention kernels' saved tensors and DeepSpeed's
buffers follow the code of torch 2.13 / transformers 5.23 / deepspeed 0.19.8 but have not been measured on a
GPU yet: run ``--measure`` there (one GPU, ``--stage none``) to check.

Measured quantity of the 10% check (``measure_step``, ``--measure``, tests/test_plan.py): one training step
(forward, backward, AdamW step) of the given recipe in ONE process without DeepSpeed (``--stage none``), after
a warm-up step (so optimizer state exists), on a synthetic batch of exactly the given shapes
(``synthetic_batch``). On CPU the peak is tracked tensor bytes: the storages alive when the step starts
(parameters, buffers, optimizer state, batch) plus the high-water mark of every tensor storage allocated during
the step (a TorchDispatchMode sees each allocation; weakref finalizers see each free). It excludes allocator
caching, fragmentation and Python objects, like ``torch.cuda.max_memory_allocated``, which is used on a GPU.

Step time: hardware FLOPs (``step_flops``) / ``--tflops_per_gpu``, and ZeRO-3's all-gathers of the backbone
(instruction encoding, student forward, teacher forward, backward; + recompute with checkpointing) and of the
teacher bank, plus the hypernet's reduce-scatter and all-gather, over ``--interconnect_gbps`` (per GPU,
between nodes) or ``--intra_node_gbps`` (one node), and with offload the host <-> GPU copies over
``--pcie_gbps``. step = max(compute, comm): DeepSpeed's prefetch overlaps
them; the no-overlap sum is reported too. Default throughput: H100 SXM bf16 dense peak 989 TFLOP/s x an
assumed 40% MFU = 396 TFLOP/s; pass a measured one (benchmarks/bench_train_step.py) instead.

FLOPs per step (``step_flops``; N = backbone matmul parameters a token passes through):
frozen base 4N per token (forward 2N + input gradients 2N, no weight gradients); attention 4*Lk*H*dk per
query token per layer forward, x3 with backward (no causal discount); adapters 6*r*(d_in+d_out) per token
per site (forward 2 + backward 4); generator 3 x its forward (2 x matmul params) per task and site;
instruction encoding 2*N_enc per instruction token (forward only); teacher forward 2N per teacher token;
gradient checkpointing recomputes the student's layers (hardware FLOPs only; MFU uses model FLOPs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tagi_ds.batch import TaskBatch
from tagi_ds.config import ConfigError, TagiConfig
from tagi_ds.recipes import RECIPES, get_recipe

GiB = 2**30
H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM datasheet, bf16 tensor core, dense
ASSUMED_MFU = 0.40
DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"


# -- shapes and parameter counts --------------------------------------------------------------------------
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
        teacher_rows=teacher_rows)


# -- activations ------------------------------------------------------------------------------------------
def _norm(c: Counts, T: int, b: int) -> int:
    """RMSNorm saved for backward: the fp32 input (the pow's), rsqrt [T, 1]; T5 also keeps the bf16 input."""
    extra = T * c.d * b if (c.arch == "t5" and b < 4) else 0
    return T * c.d * 4 + T * 4 + extra


def _site(c: Counts, T: int, d_in: int, b: int) -> int:
    """lora_delta_torch: gathered x [T, d_in], x A^T [T, r], the validity mask (x dtype), int64 indices, bool mask."""
    return T * (d_in * b + c.rank * b + b + 8 + 1)


def _attn(c: Counts, Tq: int, Tk: int, mask: int, b: int) -> int:
    """SDPA saves q, k, v, out, the fp32 logsumexp and the additive mask it was given."""
    return (2 * Tq * c.heads + 2 * Tk * c.kv_heads) * c.d_kv * b + Tq * c.heads * 4 + mask


def _ffn(c: Counts, T: int, b: int) -> int:
    """T5 gated-gelu (tanh GELU): 4 tensors in the GELU + both product inputs; relu: its output; LLaMA SwiGLU: 3."""
    if c.arch == "llama":
        return 3 * T * c.d_ff * b
    return (6 if c.gated else 1) * T * c.d_ff * b


def _sites_of(c: Counts, stack: str, tokens: dict[str, int], b: int) -> int:
    """Saved bytes of one layer's adapted sites of ``stack`` (tokens per kind of input; every layer has the same)."""
    return sum(_site(c, tokens["kv"] if (stack == "cross" and kind in ("k", "v")) else tokens["q"], d_in, b)
               for st, layer, kind, d_in, _ in c.sites if st == stack and layer == 0)


def saved_layer(c: Counts, s: Shapes, b: int) -> dict[str, int]:
    """Saved bytes of one student layer of each kind (the first layer of a stack saves no input norm)."""
    B, L, Lt, Li = s.micro_batch, s.seq_len, s.target_len, s.instr_len
    if c.arch == "t5":
        Te, Td = B * L, B * Lt
        Lx = Li + L if c.fusion else L
        Tx = B * Lx
        enc = (2 * _norm(c, Te, b) + _sites_of(c, "encoder", {"q": Te}, b)
               + _attn(c, Te, Te, B * c.heads * L * L * b, b) + _ffn(c, Te, b))
        dec = (3 * _norm(c, Td, b) + _sites_of(c, "decoder", {"q": Td}, b)
               + _sites_of(c, "cross", {"q": Td, "kv": Tx}, b)
               + _attn(c, Td, Td, c.heads * Lt * Lt * b, b)  # causal-only mask: no batch dimension
               + _attn(c, Td, Tx, B * c.heads * Lt * Lx * b, b) + _ffn(c, Td, b))
        return {"encoder": enc, "decoder": dec, "enc_input_norm": _norm(c, Te, b), "dec_input_norm": _norm(c, Td, b)}
    T, S = B * (L + Lt), L + Lt
    dec = (2 * _norm(c, T, b) + _sites_of(c, "decoder", {"q": T}, b) + _attn(c, T, T, B * S * S * b, b) + _ffn(c, T, b))
    return {"encoder": 0, "decoder": dec, "enc_input_norm": 0, "dec_input_norm": _norm(c, T, b)}


def activations(c: Counts, s: Shapes, b: int, checkpointing: bool, kl: bool = True) -> dict[str, int]:
    """Saved activations, in-scope tensors and the transient peak of one stage-2 step (bytes)."""
    B, K, L, Lt, Li, V, d = s.micro_batch, s.tasks, s.seq_len, s.target_len, s.instr_len, c.vocab, c.d
    N = B * Lt  # target tokens
    lay = saved_layer(c, s, b)
    n_e, n_d = c.enc_layers, c.dec_layers
    t5 = c.arch == "t5"
    S_student = L + Lt if not t5 else L
    Lx = Li + L if (t5 and c.fusion) else L
    # Generator: LayerNorm input, trunk input, 2 GELU inputs, 2 hidden outputs; generated A, B (the sites save them).
    gen = K * d * b + sum(K * n * ((d + c.site_dim) * b + 4 * c.hidden * b) for n, _, _ in c.groups)
    factors = sum(K * c.rank * (di + do) * b for _, _, _, di, do in c.sites)
    # param-MSE saves the teacher's factors of the batch's tasks
    teacher_factors = sum(K * c.teacher_rank * (di + do) * b for _, _, _, di, do in c.sites) if kl else 0
    loss = (3 if kl else 1) * N * V * 4  # CE log-softmax; KL: student log-softmax + teacher probabilities (fp32)
    final_norms = (_norm(c, B * L, b) + _norm(c, B * Lt, b)) if t5 else _norm(c, B * S_student, b)
    if checkpointing:
        # Per block only its input stays; masks, position bias and the fused encoder states once per stack.
        layers = (n_e * B * L + n_d * B * Lt) * d * b if t5 else n_d * B * S_student * d * b
        if t5:  # bool padding mask, position biases, the fused encoder states
            layers += B * L * L + c.heads * (L * L + Lt * Lt) * b + B * Lx * d * b
        else:
            layers += B * S_student**2
    else:
        layers = n_e * lay["encoder"] + n_d * lay["decoder"] - lay["enc_input_norm"] - lay["dec_input_norm"]
    saved = layers + final_norms + gen + factors + teacher_factors + loss
    logits_len = Lt if t5 else S_student
    scope = K * Li * d * b + B * logits_len * V * b + N * V * b  # instruction states, logits, target logits
    # Peaks of the phases after the student forward, each on top of what is alive then:
    kl_saved = 2 * N * V * 4 if kl else 0  # created by the KL, after the teacher forward
    phases = {
        "teacher_forward": saved - kl_saved + scope + (_teacher_working_set(c, s, b) if kl else 0),
        # The teacher's logits [B, Lt or its whole length, V] until cut to the targets; then the target logits
        # + 3 fp32 [N, V] temporaries of the KL.
        "kl": max(saved - kl_saved + scope + B * (Lt if t5 else Li + L + Lt) * V * b + N * V * b,
                  saved + scope + N * V * (b + 12)) if kl else saved + scope,
        # Loss gradients and the logits' gradient (LLaMA: also the shift's); the forward's scope is gone.
        "backward": saved + 2 * N * V * 4 + (0 if t5 else 2 * B * logits_len * V * b),
    }
    if checkpointing:  # one block recomputed with its backward temporaries (block input / output grads, FFN grads)
        layer_max = max(lay["encoder"], lay["decoder"])
        Tm = B * (max(L, Lt) if t5 else S_student)
        phases["backward"] = max(phases["backward"], saved + layer_max + 2 * Tm * (d + c.d_ff) * b)
    peak = max(phases.values())
    return {"saved": saved, "scope": scope, "peak": peak, "transient": peak - saved - scope, **phases,
            "per_layer_enc": lay["encoder"], "per_layer_dec": lay["decoder"]}


def _teacher_working_set(c: Counts, s: Shapes, b: int) -> int:
    """Peak of the teacher's no-grad forward (instruction + input) at one layer, plus what its stack holds."""
    B, L, Lt, Li, d, f = s.micro_batch, s.seq_len, s.target_len, s.instr_len, c.d, c.d_ff
    H, inner, kv = c.heads, c.heads * c.d_kv, c.kv_heads * c.d_kv
    if c.arch == "t5":
        Lk = Li + L
        Tt = B * Lk
        stack = H * Lk * Lk * b + B * Lk * Lk  # position bias + bool padding mask
        attn = Tt * (2 * d + 4 * inner) * b + 2 * B * H * Lk * Lk * b  # h, normed, q k v out; mask where + copy
        ffn = Tt * 2 * d * b + 4 * Tt * f * b  # h, normed, wi_0 out + 3 GELU temporaries
        enc = stack + max(attn, ffn)
        Td = B * Lt
        dec = Tt * d * b + Td * (2 * d + 4 * inner) * b + 2 * Tt * inner * b + 2 * B * H * Lt * Lk * b
        return max(enc, dec, B * Lt * (c.vocab + d) * b)  # the logits and the last hidden states
    S = Li + L + Lt
    T = B * S
    attn = T * (2 * d + 2 * inner + 2 * kv) * b + T * d * 4 + B * S * S * b  # h, normed, q k v + roped q k, fp32 norm
    mlp = T * 2 * d * b + 3 * T * f * b
    return max(attn, mlp, T * (c.vocab + d) * b)  # logits over every position


# -- the plan ---------------------------------------------------------------------------------------------
@dataclass
class PlanInput:
    model: str = "t5-xl"
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gb: float = 80.0
    stage: str = "z3"  # z3 | z2 | none (one process, no DeepSpeed)
    offload: str = "none"  # none | optimizer | param
    micro_batch: int | None = None
    examples_per_task: int | None = None
    seq_len: int | None = None
    target_len: int | None = None
    instr_len: int | None = None
    rank: int | None = None
    teacher_rows: int = 60
    gradient_checkpointing: bool | None = None
    precision: str | None = None  # bf16 | fp32
    tflops_per_gpu: float | None = None
    interconnect_gbps: float = 400.0
    intra_node_gbps: float = 2400.0
    pcie_gbps: float = 256.0
    deepspeed: str | None = None
    kl: bool = True

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def _config(p: PlanInput) -> TagiConfig:
    cfg = get_recipe(p.model)
    if p.rank is not None:
        cfg.hypernet.rank = p.rank
    if p.gradient_checkpointing is not None:
        cfg.model.gradient_checkpointing = p.gradient_checkpointing
    cfg.mode = "tagi"
    return cfg.validate()


def resolve(p: PlanInput) -> tuple[PlanInput, TagiConfig]:
    """Fill the defaults from the recipe and check the combination; errors name the flag."""
    if p.model not in RECIPES:
        raise ConfigError(f"--model {p.model!r} is not a recipe; known: {', '.join(RECIPES)}")
    for flag in ("nodes", "gpus_per_node", "micro_batch", "examples_per_task", "seq_len", "target_len", "instr_len",
                 "rank", "gpu_mem_gb", "tflops_per_gpu", "interconnect_gbps", "intra_node_gbps", "pcie_gbps"):
        v = getattr(p, flag)
        if v is not None and v <= 0:
            raise ConfigError(f"--{flag} must be > 0, got {v}")
    if p.teacher_rows < 0:
        raise ConfigError(f"--teacher_rows must be >= 0, got {p.teacher_rows}")
    if p.stage not in ("z3", "z2", "none"):
        raise ConfigError(f"--stage must be z3, z2 or none, got {p.stage!r}")
    if p.offload not in ("none", "optimizer", "param"):
        raise ConfigError(f"--offload must be none, optimizer or param, got {p.offload!r}")
    if p.offload == "param" and p.stage != "z3":
        raise ConfigError("--offload param needs --stage z3 (DeepSpeed offloads parameters only under ZeRO-3)")
    if p.stage == "none" and (p.world != 1 or p.offload != "none"):
        raise ConfigError("--stage none is one process without DeepSpeed: use --nodes 1 --gpus_per_node 1 "
                          "--offload none")
    base = get_recipe(p.model)
    q = dataclasses.replace(p)
    q.micro_batch = q.micro_batch or base.data.tasks_per_batch * base.data.examples_per_task
    q.examples_per_task = q.examples_per_task or base.data.examples_per_task
    q.seq_len = q.seq_len or base.data.max_source_length
    q.target_len = q.target_len or base.data.max_target_length
    q.instr_len = q.instr_len or base.data.max_instruction_length
    q.rank = q.rank or base.hypernet.rank
    if q.gradient_checkpointing is None:
        q.gradient_checkpointing = base.model.gradient_checkpointing
    q.precision = q.precision or ("fp32" if base.model.dtype == "float32" else "bf16")
    if q.precision not in ("bf16", "fp32"):
        raise ConfigError(f"--precision must be bf16 or fp32, got {q.precision!r}")
    q.tflops_per_gpu = q.tflops_per_gpu or H100_BF16_DENSE_TFLOPS * ASSUMED_MFU
    q.kl = q.kl and q.teacher_rows > 0
    return q, _config(q)


def shapes_of(p: PlanInput, micro_batch: int | None = None) -> Shapes:
    B = micro_batch or p.micro_batch
    return Shapes(B, max(1, math.ceil(B / p.examples_per_task)), p.seq_len, p.target_len, p.instr_len)


def _ds_zero(p: PlanInput) -> dict[str, Any]:
    path = Path(p.deepspeed) if p.deepspeed else DS_CONFIGS / ("z2.json" if p.stage == "z2" else "z3.json")
    from tagi_ds.train.engine import load_ds_json

    return load_ds_json(path).get("zero_optimization", {}) if p.stage != "none" else {}


def memory(p: PlanInput, c: Counts, s: Shapes, zero: dict[str, Any]) -> dict[str, int]:
    """Per-GPU bytes of each part (see the module docstring) and their sum, ``total``."""
    W, wb = p.world, (2 if p.precision == "bf16" else 4)
    z3, ds = p.stage == "z3", p.stage != "none"
    part = lambda n: math.ceil(n / W)  # noqa: E731
    offp, offo = p.offload == "param", p.offload in ("optimizer", "param")
    if z3:
        bb = 0 if offp else (part(c.backbone - c.backbone_persistent) + c.backbone_persistent) * wb
        teacher = 0 if offp else part(c.teacher) * wb
    else:
        bb, teacher = c.backbone * wb, c.teacher * wb
    G = c.generator
    if not ds:
        grads, opt = G * wb, 2 * G * wb
    else:
        grads = 0 if offo else part(G) * (wb + (4 if wb == 2 else 0))
        opt = 0 if offo else part(G) * (4 + 8)  # DeepSpeed keeps an fp32 flat copy even when training in fp32
    act = activations(c, s, wb, p.gradient_checkpointing, p.kl)
    gather = 0
    if z3:
        prefetch = int(zero.get("stage3_prefetch_bucket_size", 50_000_000))
        live = min(int(zero.get("stage3_max_live_parameters", 1_000_000_000)), c.largest_module + prefetch,
                   c.backbone + c.generator)
        gather = max(live, c.teacher if p.kl else 0) * wb
    buffers = 0
    if ds:
        buffers = int(zero.get("reduce_bucket_size", 500_000_000)) * wb
        if not z3:
            buffers += min(int(zero.get("allgather_bucket_size", 500_000_000)), G) * wb
    out = {"backbone": bb, "teacher_bank": teacher, "hypernet": G * wb, "gradients": grads, "optimizer": opt,
           "activations": act["saved"] + act["scope"], "transient": act["transient"], "zero3_gather": gather,
           "comm_buffers": buffers}
    # Without DeepSpeed the gradients exist only from the backward on (the forward peaks do not see them),
    # and the AdamW step adds one parameter-sized temporary; DeepSpeed's partitions are allocated throughout.
    static = bb + teacher + G * wb + opt + gather + buffers + (grads if ds else 0)
    dynamic = act["peak"]
    if not ds:
        dynamic = max(dynamic, act["backward"] + grads, grads + G * wb)
    out["total"] = static + dynamic
    return out


def usable_bytes(gpu_mem_gb: float) -> int:
    return int(0.92 * gpu_mem_gb * GiB - GiB)


def fits(p: PlanInput, c: Counts, micro_batch: int, zero: dict[str, Any]) -> bool:
    return memory(p, c, shapes_of(p, micro_batch), zero)["total"] <= usable_bytes(p.gpu_mem_gb)


def max_micro_batch(p: PlanInput, c: Counts, zero: dict[str, Any], limit: int = 1 << 16) -> int:
    """The largest micro-batch that fits (0: not even one example). Memory grows with the batch."""
    if not fits(p, c, 1, zero):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(p, c, hi, zero):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(p, c, mid, zero) else (lo, mid)
    return lo


# -- FLOPs and step time ----------------------------------------------------------------------------------
def _layer_params(c: Counts) -> dict[str, int]:
    inner, kv = c.heads * c.d_kv, c.kv_heads * c.d_kv
    ffn = (3 if c.gated else 2) * c.d * c.d_ff
    if c.arch == "t5":
        # decoder: self-attention + cross q, o + FFN per target token; cross k, v per encoder token
        return {"enc": 4 * c.d * inner + ffn, "dec_q": 6 * c.d * inner + ffn, "dec_kv": 2 * c.d * inner}
    return {"dec_q": 2 * c.d * inner + 2 * c.d * kv + ffn}


def backbone_forward_flops(c: Counts, B: int, L: int, Lt: int, Lx: int | None = None, lm_head: bool = True,
                           decoder: bool = True) -> dict[str, int]:
    """Forward FLOPs of the frozen backbone for B sequences: ``linear`` (2 x params per token) and ``attention``.
    T5: encoder over L tokens, decoder over Lt tokens cross-attending to Lx (default L) encoder states.
    LLaMA: L + Lt tokens in one causal sequence (counted as full attention)."""
    lp, inner = _layer_params(c), c.heads * c.d_kv
    if c.arch == "t5":
        Lx = L if Lx is None else Lx
        lin = 2 * B * L * c.enc_layers * lp["enc"]
        att = 4 * B * L * L * inner * c.enc_layers
        if decoder:
            lin += 2 * B * Lt * c.dec_layers * lp["dec_q"] + 2 * B * Lx * c.dec_layers * lp["dec_kv"]
            att += 4 * B * Lt * (Lt + Lx) * inner * c.dec_layers
            lin += 2 * B * Lt * c.d * c.vocab if lm_head else 0
        return {"linear": lin, "attention": att}
    S = L + Lt
    lin = 2 * B * S * c.dec_layers * lp["dec_q"] + (2 * B * S * c.d * c.vocab if lm_head else 0)
    return {"linear": lin, "attention": 4 * B * S * S * inner * c.dec_layers}


def _adapter_flops(c: Counts, B: int, L: int, Lt: int, Lx: int, rank: int, only_stacks=None) -> int:
    """Forward FLOPs of one LoRA delta per adapted site: 2 * tokens * r * (d_in + d_out)."""
    total = 0
    for stack, _, kind, d_in, d_out in c.sites:
        if only_stacks and stack not in only_stacks:
            continue
        if c.arch == "llama":
            T = B * (L + Lt)
        elif stack == "encoder":
            T = B * L
        elif stack == "cross" and kind in ("k", "v"):
            T = B * Lx
        else:
            T = B * Lt
        total += 2 * T * rank * (d_in + d_out)
    return total


def step_flops(c: Counts, s: Shapes, variant: str = "tagi", checkpointing: bool = False, kl: bool = True,
               param_mse: bool = True) -> dict[str, float]:
    """FLOPs of one micro-batch training step by component; ``model`` (for MFU) and ``hardware`` (+ recompute).

    variant ``tagi``: student on the input (+ fused instruction states), instruction encoding, generator,
    teacher forward on instruction + input (``kl``); ``concat``: one shared LoRA on instruction + input;
    ``lora``: one shared LoRA on the input alone (the plain single-LoRA step)."""
    B, K, L, Lt, Li = s.micro_batch, s.tasks, s.seq_len, s.target_len, s.instr_len
    t5 = c.arch == "t5"
    out: dict[str, float] = {}
    if variant == "concat":
        L = L + Li
    Lx = L + Li if (variant == "tagi" and t5 and c.fusion) else L
    fwd = backbone_forward_flops(c, B, L, Lt, Lx)
    out["student_base"] = 2 * fwd["linear"]  # forward 2N + input gradients 2N per token
    out["student_attention"] = 3 * fwd["attention"]
    adapters = _adapter_flops(c, B, L, Lt, Lx, c.rank)
    out["adapters"] = 3 * adapters
    if variant == "tagi":
        enc = backbone_forward_flops(c, K, Li, 0, decoder=False) if t5 else \
            backbone_forward_flops(c, K, Li, 0, lm_head=False)
        out["instruction_encoding"] = enc["linear"] + enc["attention"]
        per_task = 2 * sum(n * ((c.d + c.site_dim) * c.hidden + c.hidden * c.hidden + c.hidden * c.rank * (di + do))
                           for n, di, do in c.groups)
        out["generator"] = 3 * K * per_task
        if kl:
            tf = backbone_forward_flops(c, B, Li + L, Lt)
            out["teacher_forward"] = tf["linear"] + tf["attention"] + _adapter_flops(c, B, Li + L, Lt, Li + L,
                                                                                     c.teacher_rank)
        if param_mse:  # r x r Gram matrices per site and task, forward + backward
            out["param_mse"] = 3 * sum(2 * K * c.rank * c.teacher_rank * (di + do) * 3 for _, _, _, di, do in c.sites)
    out["model"] = sum(out.values())
    recompute = 0.0
    if checkpointing:
        blocks = backbone_forward_flops(c, B, L, Lt, Lx, lm_head=False)
        recompute = blocks["linear"] + blocks["attention"] + adapters
    out["recompute"] = recompute
    out["hardware"] = out["model"] + recompute
    return out


def step_time(p: PlanInput, c: Counts, s: Shapes) -> dict[str, float]:
    flops = step_flops(c, s, "tagi", p.gradient_checkpointing, p.kl)
    compute = flops["hardware"] / (p.tflops_per_gpu * 1e12)
    W, wb = p.world, (2 if p.precision == "bf16" else 4)
    # Backbone passes that gather the weights: instruction encoding (T5: the encoder only), student forward,
    # teacher forward, backward, and the recompute with checkpointing.
    enc_share = c.enc_layers / (c.enc_layers + c.dec_layers) if c.arch == "t5" else 1.0
    passes = enc_share + 1 + (1 if p.kl else 0) + 1 + (1 if p.gradient_checkpointing else 0)
    weights = (passes * c.backbone + (c.teacher if p.kl else 0)) * wb
    network = (weights if p.stage == "z3" else 0) + 2 * c.generator * wb  # + hypernet reduce-scatter, all-gather
    network = network * (W - 1) / W
    pcie = weights / W if p.offload == "param" else 0  # each rank fetches its partitions from pinned CPU memory
    pcie += 2 * c.generator * wb / W if p.offload != "none" else 0  # gradients down, updated weights up
    bw = (p.interconnect_gbps if p.nodes > 1 else p.intra_node_gbps) * 1e9 / 8
    comm = network / bw + pcie / (p.pcie_gbps * 1e9 / 8)
    step = max(compute, comm)
    tokens = s.micro_batch * (s.seq_len + s.target_len)
    return {"compute_s": compute, "comm_s": comm, "step_s": step, "step_no_overlap_s": compute + comm,
            "network_bytes": network, "pcie_bytes": pcie, "hardware_flops": flops["hardware"],
            "model_flops": flops["model"], "tokens_per_s_per_gpu": tokens / step, "tokens_per_s": tokens * W / step,
            "mfu": flops["model"] / step / (H100_BF16_DENSE_TFLOPS * 1e12)}


# -- putting it together ----------------------------------------------------------------------------------
ESCALATION = (("gradient_checkpointing", True), ("stage", "z3"), ("offload", "optimizer"), ("offload", "param"))


def plan(p: PlanInput) -> dict[str, Any]:
    p, cfg = resolve(p)
    zero = _ds_zero(p)
    c = count(cfg, p.teacher_rows, int(zero.get("stage3_param_persistence_threshold", 100_000)))
    s = shapes_of(p)
    mem = memory(p, c, s, zero)
    b = 2 if p.precision == "bf16" else 4
    out = {"input": dataclasses.asdict(p),
           "params": {"backbone": c.backbone, "generator": c.generator, "teacher_bank": c.teacher,
                      "sites": len(c.sites), "largest_module": c.largest_module},
           "shapes": dataclasses.asdict(s), "memory": mem, "usable": usable_bytes(p.gpu_mem_gb),
           "activations": activations(c, s, b, p.gradient_checkpointing, p.kl), "time": step_time(p, c, s)}
    out["fits"] = mem["total"] <= out["usable"]
    out["max_micro_batch"] = max_micro_batch(p, c, zero)
    if not out["fits"]:
        out["suggestions"] = suggest(p, c, out["max_micro_batch"])
    return out


def _flags(p: PlanInput, q: PlanInput) -> list[str]:
    """The command-line changes that turn ``p`` into ``q``."""
    out = []
    for key in ("nodes", "gpus_per_node", "stage", "offload", "gradient_checkpointing", "micro_batch"):
        a, b = getattr(p, key), getattr(q, key)
        if a != b:
            out.append(f"--{key} {({True: 'on', False: 'off'}[b]) if isinstance(b, bool) else b}")
    return out


def suggest(p: PlanInput, c: Counts, best_here: int) -> list[dict[str, Any]]:
    """Working configurations, fewest changes first: the largest micro-batch of this setup; the requested
    micro-batch after escalating (checkpointing, ZeRO-3, optimizer offload, parameter offload); then more
    nodes (8 GPUs each), at the requested micro-batch or, failing that, at one example."""
    options = []
    if best_here >= 1:
        options.append({"flags": _flags(p, dataclasses.replace(p, micro_batch=best_here)), "micro_batch": best_here,
                        "why": "same setup, smaller micro-batch"})
    q = dataclasses.replace(p)
    if q.stage == "none":  # one process cannot shard: the escalation starts from one GPU under DeepSpeed
        q.stage = "z2"
    for key, value in ESCALATION:
        if getattr(q, key) == value:
            continue
        setattr(q, key, value)
        if fits(q, c, p.micro_batch, _ds_zero(q)):
            options.append({"flags": _flags(p, q), "micro_batch": p.micro_batch,
                            "why": f"keeps micro-batch {p.micro_batch}"})
            return options
    for nodes in (2, 4, 8, 16, 32, 64, 128):
        if nodes * 8 <= q.world:
            continue
        r = dataclasses.replace(q, nodes=nodes, gpus_per_node=8)
        best = max_micro_batch(r, c, _ds_zero(r))
        if best >= 1:
            r.micro_batch = min(best, p.micro_batch)
            options.append({"flags": _flags(p, r), "micro_batch": r.micro_batch, "why": "more GPUs"})
            return options
    if not options:
        options.append({"flags": [], "micro_batch": 0, "why": "does not fit on up to 128 nodes x 8 GPUs"})
    return options


# -- measurement (the planner's check) --------------------------------------------------------------------
def synthetic_batch(arch: str, s: Shapes, vocab: int, mode: str = "tagi", teacher: bool = True,
                    seed: int = 0) -> TaskBatch:
    """Random ids at exactly ``s``'s lengths, K equal task segments, one padded position per view (so padding
    masks exist, as in real batches). T5: input [B, L] (concat: Li + L), labels [B, Lt]. LLaMA: prompt + target
    in one row, labels -100 on the prompt. The teacher view is instruction + input."""
    g = torch.Generator().manual_seed(seed)
    B, K, L, Lt, Li = s.micro_batch, s.tasks, s.seq_len, s.target_len, s.instr_len
    counts = [B // K + (1 if k < B % K else 0) for k in range(K)]
    ids = lambda *shape: torch.randint(4, vocab, shape, generator=g)  # noqa: E731

    def view(prompt_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if arch == "t5":
            x, labels = ids(B, prompt_len), ids(B, Lt)
        else:
            x = ids(B, prompt_len + Lt)
            labels = x.clone()
            labels[:, :prompt_len] = -100
        mask = torch.ones_like(x)
        mask[0, -1] = 0
        x[0, -1] = 0
        if arch == "llama":
            labels[0, -1] = -100
        return x, mask, labels

    x, mask, labels = view(L + Li if mode == "concat" else L)
    offsets = torch.tensor([0, *counts]).cumsum(0)
    batch = TaskBatch(x, mask, labels, offsets, task_names=[f"task{k}" for k in range(K)])
    if mode == "tagi":
        batch.instr_input_ids, batch.instr_attention_mask = ids(K, Li), torch.ones(K, Li, dtype=torch.long)
        batch.instr_attention_mask[-1, -1] = 0
        if teacher:
            batch.teacher_index = torch.arange(K)
            tx, tmask, tlabels = view(Li + L)
            if arch == "t5":
                tlabels = labels
            batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_labels = tx, tmask, tlabels
    return batch


class TensorBytesTracker(TorchDispatchMode):
    """Live bytes of tensor storages allocated while active (and their high-water mark, ``peak``).

    Storages alive before entering are ``known`` and never counted, so views and in-place updates of
    parameters and optimizer state do not count as new memory. Frees are seen through weakref finalizers."""

    def __init__(self, known: list[torch.Tensor] = ()) -> None:
        super().__init__()
        self.known = {self._key(t) for t in known}
        self.live: dict[tuple[str, int], int] = {}
        self.current = self.peak = 0

    @staticmethod
    def _key(t: torch.Tensor) -> tuple[str, int]:
        return (t.device.type, t.untyped_storage().data_ptr())

    def _free(self, key: tuple[str, int]) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key, n = self._key(t), storage.nbytes()
                if n and key not in self.live and key not in self.known:
                    self.live[key] = n
                    self.current += n
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


def storage_bytes(tensors) -> int:
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and not t.is_meta:
            seen[(t.device.type, t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()
    return sum(seen.values())


def measure_step(p: PlanInput, device: str | None = None, seed: int = 0) -> dict[str, int]:
    """Peak bytes of one plain-torch training step at ``p``'s shapes (definition in the module docstring)."""
    from tagi_ds.model import build_backbone, build_model

    p, cfg = resolve(p)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if p.precision == "bf16" else torch.float32
    torch.manual_seed(seed)
    s = shapes_of(p)
    backbone = build_backbone(cfg)
    model = build_model(cfg, "finetune", backbone, num_bank_rows=max(p.teacher_rows, s.tasks),
                        with_teacher=p.kl).to(dev, dtype)
    cfg.loss.kl_weight = cfg.loss.param_weight = 1.0 if p.kl else 0.0
    batch = synthetic_batch(cfg.model.arch, s, cfg.model.vocab_size, teacher=p.kl, seed=seed).to(dev)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)

    def step() -> None:
        loss, _ = model(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state exists from here on
    state = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    batch_tensors = [v for v in vars(batch).values() if torch.is_tensor(v)]
    known = [*model.parameters(), *model.buffers(), *state, *batch_tensors]
    static = {"parameters": storage_bytes(model.parameters()), "buffers": storage_bytes(model.buffers()),
              "optimizer": storage_bytes(state), "batch": storage_bytes(batch_tensors)}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return {**static, "baseline": base, "step_peak": torch.cuda.max_memory_allocated() - base,
                "peak": torch.cuda.max_memory_allocated()}
    with TensorBytesTracker(known) as tracker:
        step()
    base = storage_bytes(known)
    return {**static, "baseline": base, "step_peak": tracker.peak, "peak": base + tracker.peak}


# -- CLI --------------------------------------------------------------------------------------------------
def _on_off(v: str) -> bool:
    if v not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {v!r}")
    return v == "on"


def parser() -> argparse.ArgumentParser:
    a = argparse.ArgumentParser(prog="python -m tagi_ds.plan", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a.add_argument("--model", default="t5-xl", choices=list(RECIPES), help="recipe whose shapes are planned")
    a.add_argument("--nodes", type=int, default=1)
    a.add_argument("--gpus_per_node", type=int, default=None, help="default 8 (1 with --stage none)")
    a.add_argument("--gpu_mem_gb", type=float, default=80.0, help="memory per GPU, GiB")
    a.add_argument("--stage", default="z3", choices=["z3", "z2", "none"], help="ZeRO stage; none = one process")
    a.add_argument("--offload", default="none", choices=["none", "optimizer", "param"])
    a.add_argument("--deepspeed", default=None, metavar="PATH", help="DeepSpeed JSON for bucket sizes "
                   "(default ds_configs/z3.json or z2.json)")
    a.add_argument("--micro_batch", type=int, default=None, help="examples per GPU per micro-step "
                   "(default: recipe's tasks_per_batch x examples_per_task)")
    a.add_argument("--examples_per_task", type=int, default=None, help="tasks per micro-batch = ceil(B / this)")
    a.add_argument("--seq_len", type=int, default=None, help="input tokens (default: data.max_source_length)")
    a.add_argument("--target_len", type=int, default=None, help="target tokens (default: data.max_target_length)")
    a.add_argument("--instr_len", type=int, default=None, help="instruction tokens (data.max_instruction_length)")
    a.add_argument("--rank", type=int, default=None, help="generated LoRA rank (hypernet.rank)")
    a.add_argument("--teacher_rows", type=int, default=60, help="teacher bank rows (SNI: 60 categories); 0 = "
                   "no teacher (no KL, no param-MSE)")
    a.add_argument("--gradient_checkpointing", type=_on_off, default=None, metavar="on|off")
    a.add_argument("--precision", default=None, choices=["bf16", "fp32"],
                   help="default: bf16 for GPU recipes, fp32 for the tiny ones")
    a.add_argument("--tflops_per_gpu", type=float, default=None,
                   help=f"achieved TFLOP/s per GPU (default {H100_BF16_DENSE_TFLOPS:g} x {ASSUMED_MFU:g})")
    a.add_argument("--interconnect_gbps", type=float, default=400.0, help="between nodes, Gbit/s per GPU")
    a.add_argument("--intra_node_gbps", type=float, default=2400.0, help="within a node (NVLink), Gbit/s per GPU")
    a.add_argument("--pcie_gbps", type=float, default=256.0, help="host <-> GPU (offload), Gbit/s per GPU")
    a.add_argument("--json", action="store_true", help="print the plan as JSON")
    a.add_argument("--measure", action="store_true", help="also run one real step here (--stage none shapes) "
                   "and print its measured peak next to the prediction")
    return a


def _fmt(n: float) -> str:
    return f"{n / GiB:,.2f} GiB" if n >= 0.1 * GiB else f"{n / 2**20:,.1f} MiB"


def render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    p, m, t = result["input"], result["memory"], result["time"]
    con = Console(width=max(100, Console().width))
    head = (f"{p['model']} on {p['nodes']} node(s) x {p['gpus_per_node']} GPU(s), {p['gpu_mem_gb']:g} GiB each; "
            f"stage {p['stage']}, offload {p['offload']}, {p['precision']}, checkpointing "
            f"{'on' if p['gradient_checkpointing'] else 'off'}")
    pr = result["params"]
    con.print(head)
    con.print(f"parameters: backbone {pr['backbone']:,}, generator {pr['generator']:,} (trainable), teacher bank "
              f"{pr['teacher_bank']:,} ({p['teacher_rows']} rows), {pr['sites']} adapted sites")
    sh = result["shapes"]
    con.print(f"micro-batch {sh['micro_batch']} examples of {sh['tasks']} task(s); lengths: input {sh['seq_len']}, "
              f"target {sh['target_len']}, instruction {sh['instr_len']}; rank {p['rank']}")
    table = Table(title="memory per GPU")
    table.add_column("part")
    table.add_column("bytes", justify="right")
    table.add_column("share", justify="right")
    for k, v in m.items():
        if k != "total":
            table.add_row(k, _fmt(v), f"{100 * v / max(1, m['total']):.1f}%")
    table.add_row("[bold]total (peak allocated)[/bold]", f"[bold]{_fmt(m['total'])}[/bold]", "")
    table.add_row("usable (0.92 x mem - 1 GiB)", _fmt(result["usable"]), "")
    con.print(table)
    if result["fits"]:
        con.print(f"[green]fits[/green]: largest micro-batch that fits {result['max_micro_batch']}")
    else:
        con.print(f"[red]does not fit[/red]: needs {_fmt(m['total'])} of {_fmt(result['usable'])} usable "
                  f"(largest micro-batch that fits: {result['max_micro_batch']})")
    for i, opt in enumerate(result.get("suggestions", [])):
        if opt["micro_batch"]:
            label = "smallest working configuration" if i == 0 else "or"
            con.print(f"{label}: [bold]{' '.join(opt['flags'])}[/bold] ({opt['why']})")
        else:
            con.print(f"[red]{opt['why']}[/red]")
    tt = Table(title="step time estimate (one micro-batch per GPU)")
    for col in ("compute", "comm", "step", "no overlap", "tokens/s (all GPUs)", "MFU vs 989 TFLOP/s"):
        tt.add_column(col, justify="right")
    tt.add_row(f"{t['compute_s'] * 1e3:,.1f} ms", f"{t['comm_s'] * 1e3:,.1f} ms", f"{t['step_s'] * 1e3:,.1f} ms",
               f"{t['step_no_overlap_s'] * 1e3:,.1f} ms", f"{t['tokens_per_s']:,.0f}", f"{100 * t['mfu']:.1f}%")
    con.print(tt)
    con.print(f"at {p['tflops_per_gpu']:g} TFLOP/s per GPU, {p['interconnect_gbps']:g} Gbit/s between nodes, "
              f"{p['intra_node_gbps']:g} Gbit/s within a node, {p['pcie_gbps']:g} Gbit/s host <-> GPU; "
              f"{t['model_flops'] / 1e12:,.2f} TFLOP model, "
              f"{t['hardware_flops'] / 1e12:,.2f} TFLOP hardware per step")
    if "measured" in result:
        me = result["measured"]
        con.print(f"measured peak (one step, this machine, {me['device']}): {_fmt(me['peak'])}; predicted "
                  f"{_fmt(m['total'])} ({100 * (m['total'] / me['peak'] - 1):+.1f}%)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parser().parse_args(argv)
    keys = {f.name for f in dataclasses.fields(PlanInput)}
    if a.gpus_per_node is None:
        a.gpus_per_node = 1 if a.stage == "none" else 8
    p = PlanInput(**{k: v for k, v in vars(a).items() if k in keys})
    try:
        result = plan(p)
        if a.measure:
            if result["input"]["stage"] != "none":
                raise ConfigError("--measure runs one plain-torch step in this process: use --stage none "
                                  "--nodes 1 --gpus_per_node 1")
            result["measured"] = {**measure_step(p), "device": "cuda" if torch.cuda.is_available() else "cpu"}
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        render(result)
    return result


if __name__ == "__main__":
    main()
