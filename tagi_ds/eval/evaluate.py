"""Evaluation runs: check every input, build under DeepSpeed, run every batch on every rank in step, gather to
rank 0, score, write ``predictions.jsonl`` and ``results.json``.

Read top to bottom, :func:`run` is the whole of what ``launchers/evaluate.py`` runs once its flags are resolved
into a config and :class:`EvalArgs` (``tagi_ds.artifact_flags.resolve_evaluation``). Under ZeRO-3 every rank
calls the same modules the same number of times: the eval loader gives ranks equal step counts (short ranks
repeat batches), generation keeps ranks in step (``synced_gpus``), and results are de-duplicated by example
id on rank 0. ``kind`` generate: SNI-style greedy generation scored by exact match and ROUGE-L; ``kind`` rank:
P3-style rank classification (:mod:`tagi_ds.eval.classify`). Costs: :mod:`tagi_ds.eval.cost`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tagi_ds import artifacts, assembly, data, stages
from tagi_ds.config import ConfigError, TagiConfig, frozen
from tagi_ds.errors import say
from tagi_ds.eval import classify, cost
from tagi_ds.eval.generate import EVAL_MODES, EvalStep, cut_at_eos, greedy_config
from tagi_ds.eval.metrics import compute_metrics
from tagi_ds.files import atomic_write
from tagi_ds.runtime import dist, rundir
from tagi_ds.runtime import engine as ds_engine
from tagi_ds.runtime import preflight as preflight_checks
from tagi_ds.stages import MODES


@dataclass
class EvalArgs:
    """What the launcher adds to the config: what to evaluate, where, and how."""

    output_dir: Path
    mode: str  # tagi | concat | no_instruction | teacher
    artifact: Path | None = None  # hypernet/, baseline_lora/ or teachers/ dir (None: the bare backbone)
    kind: str = "auto"  # generate | rank | auto (rank for p3: data)
    split: str = "test"
    deepspeed: str | None = None
    max_new_tokens: int = 128
    batch_size: int | None = None
    flops: str = "auto"  # auto | counter | formula
    stage: str = "evaluate"


# -- checks that need the data (before any process group exists) ------------------------------------------
def _kind(kind: str, cfg: TagiConfig) -> str:
    if kind == "auto":
        return "rank" if data.parse_spec(cfg.data.spec).scheme == "p3" else "generate"
    if kind not in ("generate", "rank"):
        raise ConfigError(f"--task must be auto, generate or rank, got {kind!r}")
    return kind


# -- building -----------------------------------------------------------------------------------------------
def build(checked: EvalChecked, args: EvalArgs, kind: str, synced: bool) -> assembly.Run:
    """The frozen model that trained the artifact, the artifact loaded (none: the bare backbone; backbone built as
    under ZeRO-3), run by a generation / scoring step: ZeRO-3, a DeepSpeed engine without optimizer; below, the
    step itself on this rank's device (``tagi_ds.assembly``, runner ``infer``)."""
    cfg, tok = checked.cfg, checked.tok

    def step(model: torch.nn.Module) -> torch.nn.Module:
        decoder_start = None if model.causal else model.backbone.config.decoder_start_token_id
        gen = greedy_config(args.max_new_tokens, tok.eos_id, tok.pad_id, decoder_start)
        return EvalStep(model, args.mode, kind, gen, use_bank=args.artifact is not None, synced=synced)

    return assembly.assemble(
        checked.spec,
        cfg,
        checked.ds,
        tok.special_ids,
        runner="infer",
        world_size=dist.world_size(),
        rows=len(checked.rows) if checked.rows else 0,
        teacher=False,
        loads=assembly.Loads(artifact=args.artifact),
        step=step,
    )


# -- the run ------------------------------------------------------------------------------------------------
@dataclass
class EvalChecked:
    """What :func:`preflight` checked and loaded (nothing written, no process group yet)."""

    cfg: TagiConfig  # frozen (config.frozen)
    spec: stages.Spec  # the model that trained the artifact: its stage, in the artifact's mode
    ds: dict
    tok: Any
    tasks: list
    kind: str
    rows: dict[str, int] | None
    scored: list
    method: str


def preflight(cfg: TagiConfig, args: EvalArgs) -> EvalChecked:
    """Every input of the evaluation, checked before anything is written or any process group starts: the
    output dir, the DeepSpeed JSON (DeepSpeed's schema), tokenizer and data, and the artifact against the
    model this run builds (on the meta device): config keys, sites, every tensor's shape, the files whole."""
    preflight_checks.check_output_dir(args.output_dir)
    ds = preflight_checks.deepspeed_config(args.deepspeed, cfg, preflight_checks.env_world_size())
    tok = data.load_tokenizer(cfg)
    tasks = data.load_tasks(cfg.data.spec, cfg.data, args.split)
    kind = _kind(args.kind, cfg)
    mode = MODES[args.mode]
    rows = None
    if mode.source.per_task:  # each task's own teacher
        rows, _ = artifacts.read_teacher_rows(args.artifact)
        artifacts.check_rows(
            tasks,
            rows,
            cfg.teacher.granularity,
            f"--teachers {str(args.artifact)!r}",
            "evaluate teachers on the tasks they were trained on (--split train)",
        )
    scored = classify.expand_choices(tasks) if kind == "rank" else tasks
    method = cost.resolve_method(args.flops)
    spec = stages.spec(mode.stage, cfg)
    model = assembly.meta_model(cfg, spec, tok.special_ids, rows=len(rows) if rows else 0)
    if args.artifact is not None:
        artifacts.check(args.artifact, model, mode.flag)
    return EvalChecked(frozen(cfg), spec, ds, tok, tasks, kind, rows, scored, method)


def run(cfg: TagiConfig, args: EvalArgs) -> dict[str, Any] | None:
    """Preflight, then evaluate; returns the results dict on rank 0 (None elsewhere)."""
    return evaluate(cfg, args, preflight(cfg, args))


def evaluate(cfg: TagiConfig, args: EvalArgs, checked: EvalChecked) -> dict[str, Any] | None:
    """Evaluate what :func:`preflight` checked (``cfg``: its frozen copy, ``checked.cfg``, runs); returns the
    results dict on rank 0 (None elsewhere)."""
    cfg, ds, tok, tasks, kind, rows, scored, method = (
        checked.cfg,
        checked.ds,
        checked.tok,
        checked.tasks,
        checked.kind,
        checked.rows,
        checked.scored,
        checked.method,
    )
    rundir.start(rundir.RunStart.of(cfg, ds, args))  # process group, seed, config.json
    mode = MODES[args.mode]
    synced = dist.world_size() > 1 and ds_engine.zero_stage(ds) == 3
    run = build(checked, args, kind, synced)
    model, runner, device = run.model, run.runner, run.device
    use_bank = args.artifact is not None  # without one, the bare backbone (concat / no_instruction)
    loader = data.build_eval_loader(
        cfg,
        tok,
        args.split,
        dist.rank(),
        dist.world_size(),
        generation=kind == "generate",
        tasks=scored,
        batch_size=args.batch_size,
    )
    adapter_rank = cfg.hypernet.rank if mode.instruction else model.bank.rank if use_bank else 0
    formula = cost.FlopFormula(model, adapter_rank) if method == "formula" else None
    say(
        f"tagi-ds evaluate: mode {args.mode}, {kind}, {len(tasks)} tasks, {len(loader)} batches per rank on "
        f"{dist.world_size()} rank(s), ZeRO-{ds_engine.zero_stage(ds)}, FLOPs by {method}"
    )

    t0 = time.perf_counter()
    local: list[dict[str, Any]] = []
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if rows is not None:
                keys = batch.task_names if cfg.teacher.granularity == "task" else batch.categories
                batch.teacher_index = torch.tensor([rows[k] for k in keys], dtype=torch.long)
            batch = batch.to(device)
            with cost.measure(method, device) as m:
                out = runner(batch)
            local.extend(_batch_records(batch, out, m, formula, tok, mode.instruction))
            if (i + 1) % max(1, len(loader) // 10) == 0 or i + 1 == len(loader):
                say(f"[eval] batch {i + 1}/{len(loader)} ({time.perf_counter() - t0:.1f}s)")
    everything = dist.gather_object(local)
    wall_s = time.perf_counter() - t0
    results = None
    if dist.is_main():
        results = finish(Path(args.output_dir), tasks, kind, everything, wall_s, method, args)
    dist.barrier()
    return results


def _batch_records(batch, out: dict[str, torch.Tensor], m: cost.Measured, formula, tok, tagi: bool) -> list[dict]:
    """One record per row: its id, result (text or score), and its share of the batch's cost."""
    n = len(batch.example_ids)
    share = m.wall_s / n
    if "tokens" in out:
        rows = cut_at_eos(out["tokens"].cpu(), tok.eos_id)
        decoder = torch.tensor([min(len(r) + 1, out["tokens"].shape[1]) for r in rows])  # + eos when it came
        results = [{"prediction": tok.decode(r), "new_tokens": int(d)} for r, d in zip(rows, decoder.tolist())]
    else:
        decoder = (batch.labels != -100).sum(1).cpu()
        results = [{"score": float(s)} for s in out["scores"].float().cpu().tolist()]
    if formula is not None:
        flops = formula.per_example(batch, decoder, tagi, generated="tokens" in out)
    else:
        flops = [m.flops / n if m.flops is not None else 0.0] * n
    return [{"id": i, **r, "flops": f, "wall_s": share} for i, r, f in zip(batch.example_ids, results, flops)]


def _dedupe(gathered: list[list[dict]]) -> dict[str, dict]:
    """First record per id (short ranks repeated batches that another rank also ran)."""
    seen: dict[str, dict] = {}
    for part in gathered:
        for rec in part:
            seen.setdefault(rec["id"], rec)
    return seen


def _generation_records(tasks, by_id: dict[str, dict]) -> list[dict[str, Any]]:
    records = []
    for task in tasks:
        for ex in task.instances:
            rec = by_id.get(ex.id)
            if rec is None:
                raise RuntimeError(f"evaluation lost example {ex.id!r} of task {task.name!r} in gathering")
            records.append(
                {
                    "id": ex.id,
                    "task": task.name,
                    "category": task.category,
                    "prediction": rec["prediction"],
                    "references": list(ex.outputs),
                }
            )
    return records


def finish(
    out: Path, tasks, kind: str, gathered: list[list[dict]], wall_s: float, method: str, args: EvalArgs
) -> dict[str, Any]:
    """Score the de-duplicated records and write predictions.jsonl and results.json (atomically)."""
    by_id = _dedupe(gathered)
    if kind == "rank":
        records, results = classify.summarize(tasks, {k: v["score"] for k, v in by_id.items()})
        per_task = {
            name: {"accuracy": acc, "num_examples": 0}
            for prompts in results["per_prompt"].values()
            for name, acc in prompts.items()
        }
        for rec in records:
            per_task[rec["task"]]["num_examples"] += 1
    else:
        records = _generation_records(tasks, by_id)
        results = compute_metrics(records)
        per_task = results["per_task"]
    task_of = {rec["id"]: rec["task"] for rec in records}
    for entry in per_task.values():
        entry["flops"], entry["wall_s"] = 0.0, 0.0
    for key, rec in by_id.items():  # a rank pair's cost goes to its example's task
        entry = per_task[task_of[key.rsplit(classify.SEP, 1)[0] if kind == "rank" else key]]
        entry["flops"] += rec["flops"]
        entry["wall_s"] += rec["wall_s"]
    total_flops = sum(rec["flops"] for rec in by_id.values())
    generated = kind == "generate"
    results = {
        "kind": kind,
        "mode": args.mode,
        "split": args.split,
        **results,
        "per_task": per_task,
        "flops": total_flops,
        "wall_s": wall_s,
        "cost": {
            "flops": total_flops,
            "wall_s": wall_s,
            "flops_method": method,
            "flops_per_example": total_flops / len(records),
            "wall_includes_counter": method == "counter",
            "compute_s": sum(rec["wall_s"] for rec in by_id.values()),
            "world_size": dist.world_size(),
            "max_new_tokens": args.max_new_tokens if generated else None,
            "new_tokens": sum(rec["new_tokens"] for rec in by_id.values()) if generated else None,
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write(out / "predictions.jsonl", lines)
    atomic_write(out / "results.json", json.dumps(results, indent=2) + "\n")
    headline = (
        f"accuracy {results['accuracy']:.2f}"
        if kind == "rank"
        else f"rougeL {results['rougeL']:.2f} exact_match {results['exact_match']:.2f}"
    )
    say(
        f"{headline} ({len(records)} examples, {total_flops / 1e9:.3g} GFLOPs, {wall_s:.1f}s) -> {out / 'results.json'}"
    )
    return results


__all__ = ["EVAL_MODES", "EvalArgs", "EvalChecked", "build", "evaluate", "finish", "preflight", "run"]
