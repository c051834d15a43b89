"""``python -m tagi_ds.diagnose --hypernet DIR``: does a trained hypernetwork use its instruction at all?

Four measurements on one process (the hypernetwork and the frozen backbone whole, no DeepSpeed: a diagnosis of
an artifact, not a training run), printed as a table and written to ``OUTPUT_DIR/diagnose.json``:

1. **Instruction swap** (scored with the evaluation code, :mod:`tagi_ds.eval`): every task of the split gets
   the instruction of another task (a fixed derangement) -- in the generated adapter only, in the fused
   instruction states only (T5 fusion), or in both -- and **fusion off** at eval (no instruction states in
   the decoder). A hypernet that ignores its instruction scores the same with the wrong one: swap cost ~0.
2. **Generated-adapter diversity**, per adapted site: the mean pairwise cosine of the tasks' deltas
   ``s B_t A_t`` and the energy share of their mean, ``||mean_t d_t||^2 / mean_t ||d_t||^2`` (1.0: one adapter
   for every task; 1/T: orthogonal deltas). Through r x r Gram matrices: no ``d_out x d_in`` delta is formed.
3. **Gradient ratios** of the loss terms (``tagi_ds.train.grad_ratio``: ``||grad(w_k L_k)|| / ||grad L_ce||``
   and their cosine) on a few training batches, with ``--teachers`` (without, CE is the only term).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from tagi_ds import artifacts, assembly, data, stages
from tagi_ds.config import ConfigError, apply_overrides
from tagi_ds.eval.generate import cut_at_eos, eval_adapters, generate_tokens, greedy_config, score_targets
from tagi_ds.eval.metrics import compute_metrics
from tagi_ds.files import atomic_write
from tagi_ds.runtime.flags import Parser, add_set_flag

CONDITIONS = ("right", "wrong_adapter", "wrong_fused", "wrong_both", "fusion_off")
LABELS = {
    "right": "own",
    "wrong_adapter": "wrong: adapter",
    "wrong_fused": "wrong: fused",
    "wrong_both": "wrong: both",
    "fusion_off": "fusion off",
}


def parser() -> Parser:
    p = Parser(
        prog="python -m tagi_ds.diagnose",
        description="Does a trained hypernetwork use its instruction? Instruction-swap test, fusion off, "
        "generated-adapter diversity and loss-term gradient ratios: a table and OUTPUT_DIR/diagnose.json.",
    )
    p.add_argument("--hypernet", required=True, help="a hypernet/ dir (finetune.py or pretrain.py output)")
    p.add_argument(
        "--data",
        default=None,
        help="generation task source: builtin | sni:DIR (default: the one it was trained with, from its config.json)",
    )
    p.add_argument("--split", default="test", choices=("train", "dev", "test"), help="the tasks to diagnose")
    p.add_argument("--output_dir", default=None, help="where diagnose.json goes (default: HYPERNET/../diagnose)")
    p.add_argument("--max_instances", type=int, default=20, help="instances per task for the swap test")
    p.add_argument("--max_new_tokens", type=int, default=16, help="greedy generation length")
    p.add_argument("--batch_size", type=int, default=16, help="evaluation batch size")
    p.add_argument(
        "--teachers",
        default=None,
        help="the teachers/ dir it was finetuned with: adds the KL and alignment terms to the gradient ratios",
    )
    p.add_argument(
        "--grad_batches", type=int, default=4, help="training batches for the gradient ratios (0: skip them)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the model build and of the training batches")
    add_set_flag(p)
    return p


def derangement(names: list[str]) -> dict[str, str]:
    """Each task -> the next one in sorted order (no task keeps its own instruction; needs >= 2 tasks)."""
    order = sorted(names)
    return {n: order[(i + 1) % len(order)] for i, n in enumerate(order)}


def _instructions(loader) -> dict[str, torch.Tensor]:
    """Each task's instruction token ids (unpadded), from the eval batches."""
    out = {}
    for batch in loader:
        for k, name in enumerate(batch.task_names):
            out.setdefault(name, batch.instr_input_ids[k][batch.instr_attention_mask[k].bool()])
    return out


def _with_instructions(batch, rows: list[torch.Tensor], pad_id: int):
    """``batch`` with its per-task instructions replaced by ``rows`` (padded to the longest)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=batch.instr_input_ids.dtype)
    mask = torch.zeros((len(rows), width), dtype=batch.instr_attention_mask.dtype)
    for k, r in enumerate(rows):
        ids[k, : len(r)], mask[k, : len(r)] = r, 1
    return dataclasses.replace(batch, instr_input_ids=ids, instr_attention_mask=mask)


@torch.no_grad()
def swap_test(model, cfg, tok, tasks, args) -> dict[str, dict[str, float]]:
    """EM and ROUGE-L of each condition in :data:`CONDITIONS` (``tagi_ds.eval.metrics.compute_metrics``)."""
    if len(tasks) < 2:
        raise ConfigError(f"--split {args.split}: the swap test needs at least 2 tasks, got {len(tasks)}")
    gen = greedy_config(
        args.max_new_tokens,
        tok.eos_id,
        tok.pad_id,
        None if model.causal else model.backbone.config.decoder_start_token_id,
    )
    loader = data.build_eval_loader(cfg, tok, args.split, generation=True, tasks=tasks, batch_size=args.batch_size)
    instr = _instructions(loader)
    wrong_of = derangement(list(instr))
    records: dict[str, list[dict[str, Any]]] = {c: [] for c in CONDITIONS}
    loglik: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    by_id = {ex.id: (t, ex) for t in tasks for ex in t.instances}
    scoring = data.build_eval_loader(cfg, tok, args.split, generation=False, tasks=tasks, batch_size=args.batch_size)
    for generating, source in ((True, loader), (False, scoring)):
        for batch in source:
            wrong = _with_instructions(batch, [instr[wrong_of[n]] for n in batch.task_names], tok.pad_id)
            right_ad, right_st = eval_adapters(model, batch, "tagi")
            wrong_ad, wrong_st = eval_adapters(model, wrong, "tagi")
            runs = {
                "right": (batch, right_ad, right_st),
                "wrong_adapter": (batch, wrong_ad, right_st),
                "wrong_fused": (wrong, right_ad, wrong_st),
                "wrong_both": (wrong, wrong_ad, wrong_st),
                "fusion_off": (batch, right_ad, None),
            }
            for cond, (b, ad, st) in runs.items():
                if not generating:  # teacher-forced: a continuous measure, alive where EM is still 0
                    loglik[cond].extend(score_targets(model, b, ad, st).float().tolist())
                    continue
                tokens = generate_tokens(model, b, ad, st, gen)
                for i, row in zip(batch.example_ids, cut_at_eos(tokens.cpu(), tok.eos_id)):
                    task, ex = by_id[i]
                    records[cond].append(
                        {
                            "id": i,
                            "task": task.name,
                            "category": task.category,
                            "prediction": tok.decode(row),
                            "references": list(ex.outputs),
                        }
                    )
    out = {}
    own = [r["prediction"] for r in records["right"]]
    for cond, recs in records.items():
        m = compute_metrics(recs)
        changed = sum(a != r["prediction"] for a, r in zip(own, recs)) / len(recs)
        out[cond] = {
            "exact_match": m["exact_match"],
            "rougeL": m["rougeL"],
            "changed_predictions": 100 * changed,
            "ref_loglik": sum(loglik[cond]) / len(loglik[cond]),
        }
    return out


def _gram(A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """``G[i, j] = <s B_i A_i, s B_j A_j>_F`` ``[T, T]`` from ``A [T, r, d_in]``, ``B [T, d_out, r]``."""
    btb = torch.einsum("ior,joq->ijrq", B, B)
    aat = torch.einsum("ird,jqd->ijrq", A, A)
    return (btb * aat).sum((2, 3)) * s * s


def diversity_of(factors: dict[int, tuple[torch.Tensor, torch.Tensor]], scale: float) -> dict[int, dict[str, float]]:
    """Per site: mean pairwise cosine of the T tasks' deltas and the energy share of their mean delta."""
    out = {}
    for site, (A, B) in factors.items():
        G = _gram(A.double(), B.double(), scale)
        T = G.shape[0]
        norms = G.diagonal().clamp(min=1e-30).sqrt()
        cos = G / (norms[:, None] * norms[None, :])
        off = ~torch.eye(T, dtype=torch.bool)
        out[site] = {
            "mean_pairwise_cos": float(cos[off].mean()) if T > 1 else 1.0,
            "mean_delta_energy_share": float(G.sum() / T**2 / G.diagonal().mean().clamp(min=1e-30)),
            "mean_delta_norm": float(norms.mean()),
        }
    return out


@torch.no_grad()
def diversity(model, cfg, tok, tasks, args) -> dict[str, Any]:
    loader = data.build_eval_loader(cfg, tok, args.split, generation=True, tasks=tasks, batch_size=args.batch_size)
    instr = _instructions(loader)
    names = sorted(instr)
    first = next(iter(loader))
    batch = _with_instructions(first, [instr[n] for n in names], tok.pad_id)
    _, pooled = model.encoder(batch.instr_input_ids, batch.instr_attention_mask)
    factors = dict(enumerate(model.generator(pooled)))
    per_site = diversity_of(factors, model.generator.scale)
    sites = {f"{model.sites[i].stack}.{model.sites[i].layer}.{model.sites[i].kind}": v for i, v in per_site.items()}
    mean = {k: sum(v[k] for v in per_site.values()) / len(per_site) for k in next(iter(per_site.values()))}
    return {"tasks": len(names), "per_site": sites, "mean_over_sites": mean}


def grad_ratios(model, cfg, tok, args, rows) -> dict[str, float]:
    from tagi_ds.train.grad_ratio import StepRatios

    tasks = data.load_tasks(cfg.data.spec, cfg.data, "train")
    cfg.train.seed = args.seed
    batches = iter(data.build_train_loader(cfg, tok, stage="finetune", teacher_rows=rows, tasks=tasks))
    r = StepRatios(model, cfg.loss)
    for _ in range(args.grad_batches):
        r.add(next(batches))
    return r.result() or {"note": "CE is the only loss term (pass --teachers for KL and alignment)"}


def run(args) -> dict[str, Any]:
    path = Path(args.hypernet)
    for key in ("max_instances", "max_new_tokens", "batch_size"):
        if getattr(args, key) <= 0:
            raise ConfigError(f"--{key}: must be > 0 ({getattr(args, key)})")
    if args.grad_batches < 0:
        raise ConfigError(f"--grad_batches: must be >= 0 ({args.grad_batches})")
    cfg = artifacts.read_config(path, "--hypernet")
    if not stages.MODES[cfg.mode].instruction:  # no generated adapters to diagnose
        raise ConfigError(f"--hypernet {str(path)!r}: a mode {cfg.mode} run has no hypernetwork")
    if args.data:
        cfg.data.spec = args.data
    cfg = apply_overrides(cfg, [*args.overrides, f"data.max_instances_per_task={args.max_instances}"])
    out = Path(args.output_dir) if args.output_dir else path.parent / "diagnose"
    tok = data.load_tokenizer(cfg)
    tasks = data.load_tasks(cfg.data.spec, cfg.data, args.split)
    rows = None
    if args.teachers:
        cfg, rows = artifacts.adopt_teacher(cfg, Path(args.teachers))
    torch.manual_seed(args.seed)
    model = assembly.assemble(
        stages.spec("finetune", cfg),
        cfg,
        {},
        tok.special_ids,
        runner="none",
        rows=len(rows) if rows else 0,
        teacher=rows is not None,
        loads=assembly.Loads(artifact=path, teachers=Path(args.teachers) if rows is not None else None),
    ).model.eval()
    report: dict[str, Any] = {
        "hypernet": str(path),
        "data": cfg.data.spec,
        "split": args.split,
        "tasks": len(tasks),
        "instances_per_task": args.max_instances,
        "fusion": model.fusion,
    }
    report["swap"] = swap_test(model, cfg, tok, tasks, args)
    right = report["swap"]["right"]["exact_match"]
    report["swap_cost_em"] = {c: right - report["swap"][c]["exact_match"] for c in CONDITIONS if c != "right"}
    own_ll = report["swap"]["right"]["ref_loglik"]
    report["swap_cost_loglik"] = {c: own_ll - report["swap"][c]["ref_loglik"] for c in CONDITIONS if c != "right"}
    report["diversity"] = diversity(model, cfg, tok, tasks, args)
    if args.grad_batches:
        model.train()
        report["grad_ratios"] = grad_ratios(model, cfg, tok, args, rows)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "diagnose.json", json.dumps(report, indent=2) + "\n")
    report["output"] = str(out / "diagnose.json")
    return report


def show(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"instruction swap: {report['tasks']} {report['split']} tasks x {report['instances_per_task']}")
    for col in ("condition", "EM", "ROUGE-L", "EM cost", "ref log-lik", "log-lik cost", "% changed"):
        t.add_column(col)
    for c in CONDITIONS:
        m = report["swap"][c]
        em = "" if c == "right" else f"{report['swap_cost_em'][c]:+.1f}"
        ll = "" if c == "right" else f"{report['swap_cost_loglik'][c]:+.4f}"
        t.add_row(
            LABELS[c],
            f"{m['exact_match']:.1f}",
            f"{m['rougeL']:.1f}",
            em,
            f"{m['ref_loglik']:.4f}",
            ll,
            f"{m['changed_predictions']:.0f}",
        )
    console.print(t)
    d = Table(title=f"generated-adapter diversity over {report['diversity']['tasks']} tasks")
    for col in ("site", "mean pairwise cos", "energy share of mean delta", "mean ||delta||"):
        d.add_column(col)
    for site, v in [*report["diversity"]["per_site"].items(), ("mean", report["diversity"]["mean_over_sites"])]:
        d.add_row(
            site, f"{v['mean_pairwise_cos']:.3f}", f"{v['mean_delta_energy_share']:.3f}", f"{v['mean_delta_norm']:.3g}"
        )
    console.print(d)
    if "grad_ratios" in report:
        console.print(
            "gradient ratios vs CE: "
            + ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in report["grad_ratios"].items()
            )
        )
    console.print(f"-> {report['output']}")


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    show(run(args))


if __name__ == "__main__":
    from tagi_ds.runtime.preflight import guarded

    guarded(main)
