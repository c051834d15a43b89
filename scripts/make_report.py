#!/usr/bin/env python
"""docs/results.md + docs/results.png from a scripts/reproduce.sh run directory.

Every number in the text is read from the run's results.json files; the sentences that compare methods
are generated from those numbers, so the text claims only what the table shows.

    python scripts/make_report.py --run runs/reproduce --docs docs --wall_s 2400
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
from pathlib import Path

from tagi_ds.files import atomic_write

HELD = [  # (key, label, what it is)
    ("no_instruction", "No instruction", "shared LoRA, input only"),
    ("concat", "Concat (Tk-Instruct analogue)", "shared LoRA, instruction + input in every example"),
    ("tagi", "**TAGI**", "generated LoRA + fusion; CE + KL + param-MSE; pretrained hypernet"),
    ("no_pretrain", "TAGI w/o pretraining", "hypernet finetuned from scratch"),
    ("no_kl", "TAGI w/o KL", "loss.kl_weight=0"),
    ("no_param", "TAGI w/o param-MSE", "loss.param_weight=0"),
    ("no_fusion", "TAGI w/o fusion", "hypernet.fusion=false"),
]
LABELS = {k: lab.strip("*") for k, lab, _ in HELD}  # plain labels (no markdown bold)
SEEN = [
    ("teacher_model", "Teacher model (TEACHER_MODEL=1: a concat run merged into the backbone; the KL target)"),
    ("teachers", "LoRA teachers, one per {granularity} (upper bound)"),
    ("tagi", "TAGI"),
    ("concat", "Concat"),
]
FT = ["ft_tagi", "ft_concat", "ft_no_instruction", "ft_no_pretrain", "ft_no_kl", "ft_no_param", "ft_no_fusion"]
# The paper's ablation (T5-XL, SNI ROUGE-L, Table 5) has a column per instruction setting: a run is compared with
# the column of the setting it ran (data.setting of its TAGI run), never the other one.
PAPER_ABLATION = {
    "def": {"no_pretrain": "-1.3", "no_kl": "-2.7", "no_param": "-0.9", "no_fusion": "-13.3"},
    "def_pos": {"no_pretrain": "-0.7", "no_kl": "-2.4", "no_param": "-1.1", "no_fusion": "-15.7"},
}
PAPER_SETTING = {"def": "Def", "def_pos": "Def+2Pos"}


def run_setting(run: Path, seeds: list[int]) -> str:
    """data.setting of the run's TAGI finetuning (def when its config.json is absent: the config's default)."""
    cfg = run / (f"s{seeds[0]}" if seeds else "") / "ft_tagi" / "config.json"
    return json.loads(cfg.read_text())["tagi"]["data"]["setting"] if cfg.is_file() else "def"


def load(path: Path) -> dict | None:
    p = path / "results.json"
    return json.loads(p.read_text()) if p.is_file() else None


def seeds_of(run: Path) -> list[int]:
    """The seeds whose held-out evaluations exist (``eval/s<seed>/``), in order."""
    return sorted(int(d.name[1:]) for d in (run / "eval").glob("s[0-9]*") if d.is_dir())


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def std(xs: list[float]) -> float:
    """Sample standard deviation (n - 1); 0 for one value."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5


# Two-sided 95% Student t critical values by degrees of freedom (scipy is not a dependency); a df between two keys
# takes the smaller key's value (the wider interval), above 30 the normal 1.96.
T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}


def t975(df: int) -> float:
    return 1.96 if df > 30 else T975[max(k for k in T975 if k <= df)]


def paired_ci(diffs: list[float]) -> tuple[float, float, float, float] | None:
    """(mean, standard error, 95% CI low, high) of per-seed paired differences (t with n - 1 df); None below 2."""
    if len(diffs) < 2:
        return None
    m, se = mean(diffs), std(diffs) / len(diffs) ** 0.5
    h = t975(len(diffs) - 1) * se
    return m, se, m - h, m + h


def bootstrap_ci(
    per_seed_task: dict[int, dict[str, float]], reps: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """95% percentile interval of the mean difference when seeds and tasks are both resampled (with replacement,
    independently): a task-level effect carried by a few tasks widens it, as seeds alone cannot show.
    ``per_seed_task``: seed -> task -> difference; the tasks every seed has. None below 2 seeds or 2 tasks."""
    import random

    seeds = sorted(per_seed_task)
    tasks = sorted(set.intersection(*(set(v) for v in per_seed_task.values()))) if seeds else []
    if len(seeds) < 2 or len(tasks) < 2:
        return None
    rng = random.Random(seed)
    means = []
    for _ in range(reps):  # one draw of seeds and one of tasks per replicate: the two-way (crossed) bootstrap
        drawn_seeds, drawn_tasks = rng.choices(seeds, k=len(seeds)), rng.choices(tasks, k=len(tasks))
        means.append(mean([per_seed_task[s][t] for s in drawn_seeds for t in drawn_tasks]))
    means.sort()
    return means[int(0.025 * reps)], means[int(0.975 * reps) - 1]


def verdict(ci: tuple[float, float, float, float] | None, boot: tuple[float, float] | None, a: str, b: str) -> str:
    """The interval text and the one claim it allows: an ordering only where the 95% CI excludes 0."""
    if ci is None:
        return "one seed: no interval, no claim"
    m, se, lo, hi = ci
    text = f"mean {m:+.2f}, SE {se:.2f}, 95% CI [{lo:+.2f}, {hi:+.2f}]"
    if boot is not None:
        text += f", seed x task bootstrap [{boot[0]:+.2f}, {boot[1]:+.2f}]"
    if lo > 0 or hi < 0:
        return f"{text}: resolved, {a} {'above' if lo > 0 else 'below'} {b}"
    return f"{text}: not resolved (the CI includes 0)"


def pm(xs: list[float]) -> str:
    return f"{mean(xs):.2f} ± {std(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import deepspeed
    import torch
    import transformers

    return (
        f"{cpu}, {os.cpu_count()} CPU cores visible (shared with other jobs), no GPU; "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, deepspeed {deepspeed.__version__}"
    )


def git_rev() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stage_seconds(run: Path, seeds: list[int]) -> dict[str, str]:
    """Wall seconds per stage; per-seed stages as the mean over seeds."""

    def secs(name: str) -> int | None:
        p = run / f"{name}.done"
        return int(p.read_text().strip() or 0) if p.is_file() else None

    out = {n: str(v) for n in ("backbone", "teachers", "pretrain") if (v := secs(n)) is not None}
    for name in FT:
        vals = [v for s in seeds if (v := secs(f"{name}_s{s}")) is not None]
        if vals:
            out[name] = f"{mean(vals):.0f}"
    return out


def invocations(run: Path) -> list[dict]:
    """Each ``reproduce.sh`` invocation in ``reproduce.log`` (a re-run appends to it): the stages it ran, those
    it reused (done by an earlier invocation or copied in; not in its wall time) and its wall time."""
    log = run / "reproduce.log"
    out: list[dict] = []
    for line in log.read_text().splitlines() if log.is_file() else []:
        if "] reproduce: OUT=" in line or not out:
            out.append({"ran": [], "reused": [], "wall_s": None, "redo_eval": False})
        if m := re.search(r"\] (start|skip) (\S+)", line):
            out[-1]["ran" if m.group(1) == "start" else "reused"].append(m.group(2))
        elif m := re.search(r"pipeline wall time (\d+)s", line):
            out[-1]["wall_s"] = float(m.group(1))
        elif "REDO_EVAL=1" in line:
            out[-1]["redo_eval"] = True
    return out


def wall_lines(run: Path, wall_s: float | None) -> list[str]:
    """The report's wall-time bullets: one invocation as one line; a resumed pipeline, one line per invocation."""
    runs = invocations(run)
    if runs and runs[-1]["wall_s"] is None:
        runs[-1]["wall_s"] = wall_s  # the report of the invocation that is finishing now
    if len(runs) <= 1:
        if not wall_s:
            return []
        reused = sorted(set(runs[0]["reused"])) if runs else []
        note = f" (stages reused from an earlier run, not included: {', '.join(reused)})" if reused else ""
        return [f"- Whole pipeline (`bash scripts/reproduce.sh`, training + evaluation): {wall_s / 60:.1f} min{note}"]
    lines = [
        f"- The pipeline ran in {len(runs)} invocations of `bash scripts/reproduce.sh` (each resumes: the "
        "stages an earlier one finished are reused, and the numbers above come from the latest run of each "
        "stage):"
    ]
    for i, r in enumerate(runs, 1):
        wall = f"{r['wall_s'] / 60:.1f} min" if r["wall_s"] else "did not finish"
        why = " with REDO_EVAL=1 (every evaluation re-run with the code of the commit above)" if r["redo_eval"] else ""
        reused = sorted(set(r["reused"]), key=r["reused"].index)
        lines.append(f"  {i}. {wall}{why}: ran {_stages(r['ran'])}; reused {_stages(reused)}")
    return lines


def _stages(names: list[str]) -> str:
    """``3 stages (backbone, teachers, ft_tagi_s0)``, or by kind when there are many."""
    if len(names) <= 6:
        return f"{len(names)} stage(s)" + (f" ({', '.join(names)})" if names else "")
    ft, ev = sum(n.startswith("ft_") for n in names), sum(n.startswith("ev_") for n in names)
    kinds = {"setup": len(names) - ft - ev, "finetuning": ft, "evaluation": ev}
    return f"{len(names)} stages (" + ", ".join(f"{v} {k}" for k, v in kinds.items() if v) + ")"


def final_loss(path: Path) -> float | None:
    """Mean loss of the last 20 logged steps of a run directory."""
    p = path / "metrics.jsonl"
    if not p.is_file():
        return None
    tail = [json.loads(x) for x in p.read_text().splitlines() if x.strip()][-20:]
    return sum(r["loss"] for r in tail) / len(tail) if tail else None


def plot(rouge: dict[str, list[float]], flops: dict[str, float], docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, _, _ in HELD if k in rouge]
    labels = [LABELS[k] for k in keys]
    means = [mean(rouge[k]) for k in keys]
    errs = [std(rouge[k]) for k in keys]
    n, n_min = max(len(v) for v in rouge.values()), min(len(v) for v in rouge.values())
    over = f"{n_min}-{n}" if n_min < n else str(n)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = ["#888" if k in ("no_instruction", "concat") else "#1f77b4" if k == "tagi" else "#9ecae1" for k in keys]
    ax1.barh(range(len(keys)), means, xerr=errs if n > 1 else None, color=colors, capsize=3)
    ax1.set_yticks(range(len(keys)), labels)
    ax1.invert_yaxis()
    ax1.set_xlim(0, max(m + e for m, e in zip(means, errs)) * 1.2 + 1)
    ax1.set_xlabel(f"ROUGE-L on 29 held-out tasks (mean{' ± sd over ' + over + ' seeds' if n > 1 else ''})")
    for i, (m, e) in enumerate(zip(means, errs)):
        ax1.text(m + e, i, f" {m:.1f}", va="center")
    ax1.set_title("Held-out tasks (built-in suite)")
    for k, lab, m in zip(keys, labels, means):
        ax2.scatter(flops[k] / 1e6, m, s=40)
        ax2.annotate(lab, (flops[k] / 1e6, m), fontsize=8, xytext=(4, 2), textcoords="offset points")
    ax2.set_xlabel("inference MFLOPs per example (counted)")
    ax2.set_ylabel("ROUGE-L")
    ax2.set_title("Quality vs inference cost")
    fig.tight_layout()
    fig.savefig(docs / "results.png", dpi=110)


class Results:
    """Every results.json of a run directory, per method and seed, and the figures the report reads."""

    def __init__(self, run: Path) -> None:
        self.run, self.seeds = run, seeds_of(run)
        # method -> seed -> results.json (the ablations may run on fewer seeds)
        self.by_seed = {
            k: rs for k, _, _ in HELD if (rs := {s: r for s in self.seeds if (r := load(run / "eval" / f"s{s}" / k))})
        }
        self.seen = {k: r for k, _ in SEEN if (r := load(run / "eval" / "seen" / k)) is not None}  # seen tasks

    @property
    def res(self) -> dict[str, list[dict]]:
        return {k: list(rs.values()) for k, rs in self.by_seed.items()}

    @property
    def rouge(self) -> dict[str, list[float]]:
        return {k: [r["rougeL"] for r in rs] for k, rs in self.res.items()}

    @property
    def em(self) -> dict[str, list[float]]:
        return {k: [r["exact_match"] for r in rs] for k, rs in self.res.items()}

    @property
    def flops(self) -> dict[str, float]:
        return {k: mean([r["cost"]["flops_per_example"] for r in rs]) for k, rs in self.res.items()}

    @property
    def seed_txt(self) -> str:
        n, seeds = len(self.seeds), self.seeds
        return f"{n} seeds ({', '.join(map(str, seeds))})" if n > 1 else f"one seed ({seeds[0]})" if n else "-"

    def paired_tasks(self, a: str, b: str) -> dict[int, dict[str, float]]:
        """seed -> task -> ROUGE-L difference a - b, over the seeds both ran (results.json's per_task)."""
        by_seed, out = self.by_seed, {}
        for s in self.seeds:
            if s in by_seed[a] and s in by_seed[b]:
                pa, pb = by_seed[a][s].get("per_task") or {}, by_seed[b][s].get("per_task") or {}
                out[s] = {t: pa[t]["rougeL"] - pb[t]["rougeL"] for t in pa.keys() & pb.keys()}
        return out

    def verdict(self, a: str, b: str) -> str:
        return verdict(paired_ci(self.paired(a, b)), bootstrap_ci(self.paired_tasks(a, b)), LABELS[a], LABELS[b])

    def paired(self, a: str, b: str) -> list[float]:
        """Per-seed ROUGE-L differences a - b over the seeds both methods ran."""
        by_seed = self.by_seed
        return [
            by_seed[a][s]["rougeL"] - by_seed[b][s]["rougeL"] for s in self.seeds if s in by_seed[a] and s in by_seed[b]
        ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/reproduce")
    ap.add_argument("--docs", default="docs")
    ap.add_argument("--wall_s", type=float, default=None, help="pipeline wall time (reproduce.sh measures it)")
    args = ap.parse_args()
    run, docs = Path(args.run), Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    r = Results(run)
    lines = [
        *header(r),
        *gates(r),
        *held_out(r),
        *seen_tasks(r),
        *findings(r),
        *per_category(r),
        *setup(r, docs),
        *training_figures(r),
        *machine_and_commands(r, args.wall_s, docs),
    ]
    atomic_write(docs / "results.md", "\n".join(lines) + "\n")
    if r.rouge:
        plot(r.rouge, r.flops, docs)


def header(r: Results) -> list[str]:
    groups: dict[tuple[int, ...], list[str]] = {}  # methods run on fewer seeds (ABLATION_SEEDS), by seed set
    for k, rs in r.by_seed.items():
        if len(rs) < len(r.seeds):
            groups.setdefault(tuple(rs), []).append(LABELS[k])
    fewer_txt = ""
    if groups:
        parts = [
            f"{', '.join(labs)}: seed{'s' * (len(v) > 1)} {', '.join(map(str, v))} only" for v, labs in groups.items()
        ]
        fewer_txt = " (" + "; ".join(parts) + ", to keep the pipeline within 45 minutes)"
    return [
        "# Miniature TAGI reproduction (built-in suite, CPU)",
        "",
        "Produced by `bash scripts/reproduce.sh` (called by `make reproduce`); every number below is read from "
        f"`{r.run}/eval/*/*/results.json` by `scripts/make_report.py`. Commit {git_rev()}.",
        "",
        f"The backbone, the teachers and the pretrained hypernetwork are built once; every finetuning run and its "
        f"evaluation is repeated for {r.seed_txt}{fewer_txt}. ROUGE-L and EM are the mean ± sample standard "
        "deviation over seeds; the per-seed values follow.",
        "",
    ]


def gates(r: Results) -> list[str]:
    """The gates scripts/gates.py measured before the seeds ran (RUN/gates.json), each with what failing it means."""
    g = load_json(r.run / "gates.json")
    if g is None:
        return []
    L = [
        "## Gates (dev split, seed 0, before the seed budget: `scripts/gates.py`)",
        "",
        "| Gate | Result | Measured |",
        "|---|---|---|",
    ]
    L += [f"| {x['name']} | {'pass' if x['passed'] else '**FAIL**'} | {x['detail']} |" for x in g["gates"]]
    L.append("")
    failed = [x for x in g["gates"] if not x["passed"]]
    if failed:
        L.append(
            f"**{len(failed)} gate(s) failed; the seeds ran anyway (GATES={g['policy']}).** What each failure means "
            "for the results below:"
        )
        L += ["", *[f"- {x['name']}: {x['means']}." for x in failed], ""]
    else:
        L += ["Every gate passed.", ""]
    return L


def load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def held_out(r: Results) -> list[str]:
    rouge, em, flops, n = r.rouge, r.em, r.flops, len(r.seeds)
    L = [
        "## Held-out tasks (29 unseen tasks, greedy decoding, ROUGE-L / exact match)",
        "",
        "| Method | What it is | ROUGE-L | per seed | EM | inference FLOPs / example | FLOPs vs concat |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for k, lab, what in HELD:
        if k not in r.by_seed:
            L.append(f"| {lab} | {what} | (missing) | | | | |")
            continue
        ratio = f"{flops[k] / flops['concat']:.2f}x" if "concat" in flops else "-"
        ms = list(r.by_seed[k])
        which = f" (seed{'s' * (len(ms) > 1)} {', '.join(map(str, ms))})" if len(ms) < n else ""
        L.append(
            f"| {lab} | {what} | {pm(rouge[k])} | {' / '.join(f'{x:.1f}' for x in rouge[k])}{which} | "
            f"{pm(em[k])} | {flops[k] / 1e6:.2f} M | {ratio} |"
        )
    L.append("")
    return L


def seen_tasks(r: Results) -> list[str]:
    if not r.seen:
        return []
    L = [
        f"## Seen training tasks (first instances of each of the 76 training tasks, seed {r.seeds[0]}; these "
        "instances were in every method's training data)",
        "",
        "The teachers exist only for training tasks (the built-in held-out tasks have no training instances), "
        "so the teachers' upper bound is measured here, next to TAGI and concat on the same examples.",
        "",
        "| Method | ROUGE-L | EM | inference FLOPs / example |",
        "|---|---:|---:|---:|",
    ]
    gran = json.loads((r.run / "teachers" / "config.json").read_text())["tagi"]["teacher"]["granularity"]
    for k, lab in SEEN:
        if k in r.seen:
            s = r.seen[k]
            L.append(
                f"| {lab.format(granularity=gran)} | {s['rougeL']:.2f} | {s['exact_match']:.2f} | "
                f"{s['cost']['flops_per_example'] / 1e6:.2f} M |"
            )
    L.append("")
    return L


def findings(r: Results) -> list[str]:
    """ "What the table shows": sentences generated from the numbers, claiming only what the table shows."""
    rouge, flops, seed_txt, seen = r.rouge, r.flops, r.seed_txt, r.seen
    L = ["## What the table shows", ""]
    if "tagi" in rouge and "concat" in rouge:
        d = mean(rouge["tagi"]) - mean(rouge["concat"])
        ratio = flops["tagi"] / flops["concat"]
        within = d >= -1.0
        L.append(
            f"- TAGI vs concat on held-out tasks: {mean(rouge['tagi']):.2f} vs {mean(rouge['concat']):.2f} "
            f"ROUGE-L ({d:+.2f} points, mean over {seed_txt}) at {ratio:.2f}x the inference FLOPs per example. "
            "The goal (within 1 point of concat or better, at <= 0.4x its FLOPs) is "
            f"{'met' if within and ratio <= 0.4 else 'NOT met'} "
            f"({'quality ok' if within else 'quality gap > 1 point'}, "
            f"{'cost ok' if ratio <= 0.4 else 'cost ratio > 0.4'})."
        )
        if len(r.seeds) > 1:
            diffs = r.paired("tagi", "concat")
            L.append(
                f"- Per seed, TAGI minus concat: {', '.join(f'{x:+.1f}' for x in diffs)} "
                f"(TAGI ahead in {sum(x > 0 for x in diffs)} of {len(diffs)} seeds); paired: "
                f"{r.verdict('tagi', 'concat')}."
            )
    if "tagi" in rouge and "no_instruction" in rouge:
        L.append(
            f"- TAGI vs the no-instruction baseline: {mean(rouge['tagi']) - mean(rouge['no_instruction']):+.2f} "
            "ROUGE-L (the no-instruction baseline reads the input alone, with one shared LoRA)."
        )
    if "concat" in rouge and "no_instruction" in rouge:
        L.append(f"- Concat vs no-instruction: {mean(rouge['concat']) - mean(rouge['no_instruction']):+.2f} ROUGE-L.")
    if "tagi" in rouge:
        setting = run_setting(r.run, r.seeds)
        for k, lab, _ in HELD[3:]:
            if k in rouge:
                diffs = r.paired(k, "tagi")
                spread = f" ± {std(diffs):.2f} over {len(diffs)} seeds" if len(diffs) > 1 else ""
                L.append(
                    f"- {lab}: {mean(diffs):+.2f}{spread} ROUGE-L vs full TAGI (paper, XL, "
                    f"{PAPER_SETTING[setting]}: {PAPER_ABLATION[setting][k]}); paired: {r.verdict(k, 'tagi')}."
                )
    if "concat" in rouge and "no_instruction" in rouge and "tagi" in rouge:
        gap = mean(rouge["concat"]) - mean(rouge["no_instruction"])
        if gap < 5.0:
            top = f" (the teachers reach {seen['teachers']['rougeL']:.1f} on seen tasks)" if "teachers" in seen else ""
            best = max(mean(v) for v in rouge.values())
            L.append(
                f"- Caveat on the level: concat is only {gap:.1f} ROUGE-L above the no-instruction baseline and "
                f"the best method reaches {best:.1f}{top}: at this scale the frozen miniature backbone follows "
                "instructions only a little, so the comparison is made near the floor."
            )
    sds = [std(v) for v in rouge.values() if len(v) > 1]
    if sds:
        L.append(
            f"- Seed spread: the standard deviation over seeds is {min(sds):.1f} to {max(sds):.1f} ROUGE-L "
            "depending on the method. An ordering is claimed above only where the paired 95% CI over seeds "
            "excludes 0 (t with n - 1 df; the seed x task bootstrap beside it also resamples the tasks)."
        )
    else:
        L.append(
            "- One seed: differences of about a point between methods are within what a different seed "
            "could move; they are not significance-tested."
        )
    L.append("")
    return L


def per_category(r: Results) -> list[str]:
    res = r.res
    L = [f"## Per-category ROUGE-L (held-out, mean over {r.seed_txt})", ""]
    cats = sorted({c for rs in res.values() for x in rs for c in x.get("per_category", {})})
    if cats:
        keys = list(res)
        L.append("| category | " + " | ".join(keys) + " |")
        L.append("|---|" + "---:|" * len(keys))
        for c in cats:
            cells = []
            for k in keys:
                vals = [x["per_category"][c]["rougeL"] for x in res[k] if c in x.get("per_category", {})]
                cells.append(f"{mean(vals):.1f}" if vals else "-")
            L.append(f"| {c} | " + " | ".join(cells) + " |")
        L.append("")
    return L


def setup(r: Results, docs: Path) -> list[str]:
    """The setup of the run, read from its config.json files (the backbone's, the teachers', seed 0's)."""
    run, seeds = r.run, r.seeds
    L = ["![results](results.png)", "", "## Setup", ""]
    s0 = run / f"s{seeds[0]}" if seeds else run
    cfg_path = s0 / "ft_tagi" / "config.json"
    if cfg_path.is_file():
        c = json.loads(cfg_path.read_text())["tagi"]
        m, h, d, tr = c["model"], c["hypernet"], c["data"], c["train"]
        tcfg = json.loads((run / "teachers" / "config.json").read_text())["tagi"]
        tc, tsteps = tcfg["teacher"], tcfg["train"]["max_steps"]
        base_lr = json.loads((s0 / "ft_concat" / "config.json").read_text())["tagi"]["train"]["lr"]
        bb_cfg = run / "backbone" / "config.json"
        bb = json.loads(bb_cfg.read_text()) if bb_cfg.is_file() else {}
        bb_log = run / "backbone" / "pretrain_log.json"
        bb_rec = json.loads(bb_log.read_text()) if bb_log.is_file() else {"args": {}, "log": []}
        bb_args = bb_rec["args"]
        bb_loss = bb_rec["log"][-1]["loss_ema"] if bb_rec["log"] else "-"
        dev_link = os.path.relpath(
            Path(__file__).resolve().parents[1] / "docs" / "dev_split" / "README.md", docs.resolve()
        )
        instruction = "Definition only" if d["setting"] == "def" else f"Definition + {d['num_pos']} positive examples"
        other = "def" if d["setting"] == "def_pos" else "def_pos"
        other_cmd = (
            f'DATA_SET="data.setting={other} data.max_instruction_length={d["max_instruction_length"]}" '
            f"OUT=runs/reproduce_{other} DOCS=docs/{other} bash scripts/reproduce.sh"
        )
        L += [
            f"- Backbone: T5 (gated-GELU) d_model {bb.get('d_model')}, d_ff {bb.get('d_ff')}, "
            f"{bb.get('num_layers')}+{bb.get('num_decoder_layers')} layers, {bb.get('num_heads')} heads, vocab "
            f"{bb.get('vocab_size')} (built-in sentencepiece), pretrained by `scripts/pretrain_backbone.py` "
            f"({bb_args.get('steps')} steps x {bb_args.get('batch')} documents, lr {bb_args.get('lr')}) on the "
            "built-in corpus (training tasks' definitions, prompts and 25 instances each + generated sentences; "
            "never a held-out task) with a mix of prefix LM (T5-LM-Adapt's objective; Input/Output documents cut "
            f"at the answer with probability {bb_args.get('p_boundary')}) and text infilling (share "
            f"{bb_args.get('p_denoise')}). Frozen in every later stage: the T5-LM-Adapt analogue. Final "
            f"pretraining loss {bb_loss}. The default length (3000 steps, up from 1200) was chosen on the "
            f"built-in dev split, never on these held-out tasks ([docs/dev_split]({dev_link})).",
            f"- Adapted sites: {', '.join(m['adapted'])} of {', '.join(m['adapted_stacks'])} attention; generated "
            f"LoRA rank {h['rank']} (alpha {h['alpha']}), hypernet hidden {h['hidden']}, site embedding "
            f"{h['site_dim']}, generator {h['generator']}, pooling {h['pooling']}, fusion {h['fusion']}.",
            f"- Finetuning: {tr['max_steps']} steps, {d['tasks_per_batch']} tasks x {d['examples_per_task']} "
            f"examples per step, AdamW lr {tr['lr']}, warmup {tr['warmup_ratio']}, KL weight "
            f"{c['loss']['kl_weight']} (T={c['loss']['temperature']}), param-MSE weight {c['loss']['param_weight']} "
            f"({c['loss']['param_align']}); instruction = {instruction} (data.setting={d['setting']}), at most "
            f"{d['max_instruction_length']} tokens. The other setting is `{other_cmd}`; its report is "
            f"docs/{other}/results.md when that has been run.",
            "- Baselines: concat and no-instruction train one shared LoRA of the same rank on the same frozen "
            f"backbone with the same steps, batch and data, lr {base_lr} (learning rates were set per method from a "
            "few short tuning runs, not a sweep: the hypernetwork diverged at 5e-3, the shared LoRA trains "
            "fewer parameters and was run at 3e-3); tagi-ds saves only adapters, so Tk-Instruct's "
            "full-model finetuning is approximated by a LoRA; the backbone stays identical for every method).",
            f"- Teachers: one LoRA per training {tc['granularity']} (rank {tc['rank']}), trained jointly through the "
            f"LoRA bank on instruction + input for {tsteps} steps; targets of the KL and param-MSE terms (the "
            "paper's SNI teachers are per category too).",
        ]
    L += [
        "- Evaluation: `launchers/evaluate.py`, greedy decoding, SNI ROUGE-L / exact match over the accepted "
        "answers; FLOPs counted with torch's FlopCounterMode per batch (instruction encoding and hypernetwork "
        "included for TAGI; concat pays the instruction tokens in every example).",
        "",
    ]
    return L


def training_figures(r: Results) -> list[str]:
    """Stage wall times and final training losses."""
    run, seeds, secs = r.run, r.seeds, stage_seconds(r.run, r.seeds)
    L: list[str] = []
    if secs:
        L += [
            "Stage wall times (s; finetuning stages are the mean over seeds; two jobs in parallel, one thread each, "
            "the backbone alone on two threads): " + ", ".join(f"{k} {v}" for k, v in secs.items()) + ".",
            "",
        ]
    losses = []
    for name in ("teachers", "pretrain"):
        if (v := final_loss(run / name)) is not None:
            losses.append(f"{name} {v:.3f}")
    for name in FT:
        vals = [v for s in seeds if (v := final_loss(run / f"s{s}" / name)) is not None]
        if vals:
            losses.append(f"{name} {mean(vals):.3f}")
    L += [
        "Final training loss (mean of the last 20 logged steps; finetuning: mean over seeds): "
        + ", ".join(losses)
        + ".",
        "",
    ]
    return L


def machine_and_commands(r: Results, wall_s: float | None, docs: Path) -> list[str]:
    L = ["## Machine and wall time", "", f"- {machine()}", *wall_lines(r.run, wall_s)]
    L += [
        "",
        "## Commands",
        "",
        "```",
        "make reproduce        # = bash scripts/reproduce.sh",
        "```",
        "",
        "The stage command lines, as `scripts/reproduce.sh` ran them (also in `docs/reproduce_log/commands.txt`; "
        "each run directory's `config.json` holds the resolved config; stage logs and every `results.json` are "
        "in `docs/reproduce_log/`):",
        "",
        "```",
    ]
    log = docs / "reproduce_log" / "commands.txt"
    if log.is_file():
        L += log.read_text().splitlines()
    L += ["```", ""]
    return L


if __name__ == "__main__":
    main()
