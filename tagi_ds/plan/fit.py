"""The plan itself (``plan``: counts, shapes, memory, step time in one dict) and the fitting advice: does a
micro-batch fit (``fits``), the largest one that does (``max_micro_batch``), and, when the requested one does
not, working configurations with the fewest changes (``suggest``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tagi_ds.plan.flops import step_time
from tagi_ds.plan.gpu_memory import activations, host_memory, memory, usable_bytes
from tagi_ds.plan.inputs import PlanInput, ds_zero, resolve, shapes_of, terms_of
from tagi_ds.plan.placement import choose
from tagi_ds.plan.shapes import Counts, Shapes, count, with_teacher_model


def fits(p: PlanInput, c: Counts, micro_batch: int, zero: dict[str, Any]) -> bool:
    """``--backbone auto`` under ZeRO-3 fits if either placement does (``placement.choose`` picks between them)."""
    if p.stage == "z3" and p.backbone == "auto":
        return any(
            fits(dataclasses.replace(p, backbone=b), c, micro_batch, zero) for b in ("replicated", "partitioned")
        )
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


ESCALATION = (("gradient_checkpointing", True), ("stage", "z3"), ("offload", "optimizer"), ("offload", "param"))


def plan(p: PlanInput) -> dict[str, Any]:
    p, cfg = resolve(p)
    zero = ds_zero(p)
    threshold = int(zero.get("stage3_param_persistence_threshold", 100_000))
    c = with_teacher_model(count(cfg, p.teacher_rows, threshold), p.teacher_model, threshold)
    s = shapes_of(p)
    chosen = choose(p, c, s, zero)
    backbone = {**chosen, "options": {}}
    if p.stage == "z3":  # both placements side by side; the plan below is the chosen one's
        for b in ("replicated", "partitioned"):
            q = dataclasses.replace(p, backbone=b)
            if b == "replicated" and p.offload == "param":
                continue
            total, t = memory(q, c, s, zero)["total"], step_time(q, c, s)
            backbone["options"][b] = {
                "total": total,
                "fits": total <= usable_bytes(p.gpu_mem_gb),
                "step_s": t["step_s"],
                "zero3_host_s": t["zero3_host_s"],
                "mfu": t["mfu"],
            }
        p = dataclasses.replace(p, backbone=chosen["placement"])
    mem = memory(p, c, s, zero)
    b = 2 if p.precision == "bf16" else 4
    out = {
        "input": dataclasses.asdict(p),
        "params": {
            "backbone": c.backbone,
            "generator": c.generator,
            "teacher_bank": c.teacher,
            "teacher_model": c.teacher_model.backbone if c.teacher_model else 0,
            "sites": len(c.sites),
            "largest_module": c.largest_module,
        },
        "shapes": dataclasses.asdict(s),
        "memory": mem,
        "host_memory": host_memory(p, c),
        "usable": usable_bytes(p.gpu_mem_gb),
        "activations": activations(c, s, b, p.gradient_checkpointing, terms_of(p)),
        "time": step_time(p, c, s),
        "backbone": backbone,
        "loss_terms": term_costs(p, cfg, c, s, b),
    }
    out["vocab"] = vocab_share(p, c, out["activations"], mem)
    out["fits"] = mem["total"] <= out["usable"]
    out["max_micro_batch"] = max_micro_batch(p, c, zero)
    if not out["fits"]:
        out["suggestions"] = suggest(p, c, out["max_micro_batch"])
    return out


def term_costs(p: PlanInput, cfg, c: Counts, s: Shapes, b: int) -> dict[str, dict[str, Any]]:
    """Each loss term the plan counts (``tagi_ds.loss_terms``), with its weight and what it costs: its own FLOPs
    (``Cost.flops``; the teacher forward it may need is ``time``'s), the bytes it saves for backward
    (``Cost.saved``) and its fp32 ``[chunk, V]`` temporaries in a chunk's forward and backward (``Cost.chunk``)."""
    unit = min(c.chunk, s.micro_batch * s.target_len) * c.vocab * 4
    out = {}
    for t in terms_of(p):
        fwd, bwd = t.cost.chunk[int(c.encoder_decoder)]
        out[t.name] = {
            "kind": t.kind,
            "weight": t.weight_of(cfg.loss),
            "teacher_view": t.teacher_view,
            "flops": t.cost.flops(c, s) if t.cost.flops is not None else 0,
            "saved_bytes": t.cost.saved(c, s, b) if t.cost.saved is not None else 0,
            "chunk_forward_bytes": fwd * unit,
            "chunk_backward_bytes": bwd * unit,
        }
    return out


def vocab_share(p: PlanInput, c: Counts, act: dict[str, int], mem: dict[str, int]) -> dict[str, Any]:
    """The vocabulary's part of the per-GPU peak: the input embedding and LM head (ZeRO-3: this GPU's partition;
    ``gathered``: the whole LM head while a ZeRO-3 gather holds it, when it is the largest module), and the loss's
    working set (target rows + one chunk). ``share`` = (params + gathered + loss) / total."""
    wb = 2 if p.precision == "bf16" else 4
    if p.stage != "z3":
        params = c.vocab_params * wb
    else:
        params = 0 if p.offload == "param" else -(-c.vocab_params // p.world) * wb
    head = c.vocab * c.d
    gathered = head * wb if p.stage == "z3" and head >= c.largest_module else 0
    loss = act["loss_rows"] + act["loss_chunk"]
    return {
        "vocab_size": c.vocab,
        "params": params,
        "gathered": gathered,
        "loss": loss,
        "full_logits_fp32": act["full_logits_fp32"],
        "share": (params + gathered + loss) / max(1, mem["total"]),
    }


def _flags(p: PlanInput, q: PlanInput) -> list[str]:
    """The command-line changes that turn ``p`` into ``q``."""
    out = []
    for key in ("nodes", "gpus_per_node", "stage", "offload", "gradient_checkpointing", "micro_batch", "backbone"):
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
        options.append(
            {
                "flags": _flags(p, dataclasses.replace(p, micro_batch=best_here)),
                "micro_batch": best_here,
                "why": "same setup, smaller micro-batch",
            }
        )
    q = dataclasses.replace(p)
    if q.stage == "none":  # one process cannot shard: the escalation starts from one GPU under DeepSpeed
        q.stage = "z2"
    if q.backbone == "replicated":  # let ZeRO-3 partition the backbone where a replicated one does not fit
        q.backbone = "auto"
    for key, value in ESCALATION:
        if getattr(q, key) == value:
            continue
        setattr(q, key, value)
        if fits(q, c, p.micro_batch, ds_zero(q)):
            options.append(
                {"flags": _flags(p, q), "micro_batch": p.micro_batch, "why": f"keeps micro-batch {p.micro_batch}"}
            )
            return options
    for nodes in (2, 4, 8, 16, 32, 64, 128):
        if nodes * 8 <= q.world:
            continue
        r = dataclasses.replace(q, nodes=nodes, gpus_per_node=8)
        best = max_micro_batch(r, c, ds_zero(r))
        if best >= 1:
            r.micro_batch = min(best, p.micro_batch)
            options.append({"flags": _flags(p, r), "micro_batch": r.micro_batch, "why": "more GPUs"})
            return options
    if not options:
        options.append({"flags": [], "micro_batch": 0, "why": "does not fit on up to 128 nodes x 8 GPUs"})
    return options
