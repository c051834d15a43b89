#!/usr/bin/env python
"""The reproduction's gates: is the miniature able to show the method, before the seed budget is spent?

``scripts/reproduce.sh`` runs seed 0's TAGI, concat and no-instruction finetuning first, evaluates them on the
dev split (never on test), and calls this script on the run directory. Four gates (issue 25):

==========  ====================================================  =====================================
gate        measures                                              passes when
==========  ====================================================  =====================================
instruction the frozen backbone can use an instruction: dev EM    concat - no-instruction >= 5 EM
            of concat minus no-instruction
teacher     the KL / alignment target teaches: the teacher's      EM >= student + 10 and
            seen-task EM and training CE vs the student's          CE <= 0.8 x student
            (TAGI seed 0)
terms       every loss term pushes: grad_ratio/<term> at step 0   each ratio in [0.05, 2]
            of TAGI seed 0 (metrics.jsonl)
swap        the instruction is used: dev EM lost when every       cost >= 10 EM
            task gets another task's instruction (diagnose's
            wrong_both)
==========  ====================================================  =====================================

Each gate's value, pass/fail and what failing it means for the ablations are printed and written to
``RUN/gates.json`` (the report includes it). A gate whose input is missing fails ("not measured"). With
``--policy stop`` (reproduce.sh's default) any failure exits 1: the seeds are not worth running until it is
fixed; ``--policy warn`` exits 0 with a loud warning, and the report says which gates failed.

    python scripts/gates.py --run runs/reproduce [--policy stop|warn]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# Thresholds (issue 25).
INSTRUCTION_MIN_EM = 5.0
TEACHER_MIN_EM_LEAD = 10.0
TEACHER_MAX_CE_RATIO = 0.8
RATIO_BAND = (0.05, 2.0)
SWAP_MIN_EM = 10.0
CE_TAIL = 20  # training CE: mean of the last 20 logged steps (as make_report.final_loss)

MEANS = {
    "instruction": "the frozen backbone cannot read the instruction: concat, TAGI and no-instruction differ only by "
    "noise, and w/o fusion (which removes the instruction from the decoder) cannot show an effect",
    "teacher": "the KL and alignment targets are no better than the student: w/o KL and w/o param-MSE are expected "
    "to be >= full TAGI, so their ablations measure nothing about distillation",
    "terms": "a term outside the band is inert (< 0.05: its ablation is a re-run with another seed) or dominates "
    "CE (> 2: the ablation measures its over-weighting); retune its weight on dev",
    "swap": "the hypernetwork ignores its instruction: held-out EM is the instruction-blind guess, and no ablation "
    "of how the instruction is used (pretraining, fusion, KL) can be read",
}


@dataclass
class Gate:
    name: str
    value: float | dict | None  # the measured quantity (None: not measured)
    passed: bool
    detail: str  # the numbers and the threshold, one line
    means: str  # what failing it means for the ablations


def instruction_gate(concat_em: float | None, no_instruction_em: float | None) -> Gate:
    if concat_em is None or no_instruction_em is None:
        return Gate(
            "instruction",
            None,
            False,
            "not measured (dev evaluation of concat / no-instruction missing)",
            MEANS["instruction"],
        )
    gap = concat_em - no_instruction_em
    return Gate(
        "instruction",
        gap,
        gap >= INSTRUCTION_MIN_EM,
        f"dev EM concat {concat_em:.1f} - no-instruction {no_instruction_em:.1f} = {gap:+.1f} "
        f"(needs >= {INSTRUCTION_MIN_EM:g})",
        MEANS["instruction"],
    )


def teacher_gate(
    teacher_em: float | None, student_em: float | None, teacher_ce: float | None, student_ce: float | None
) -> Gate:
    if None in (teacher_em, student_em, teacher_ce, student_ce):
        return Gate(
            "teacher", None, False, "not measured (seen-task evaluation or training metrics missing)", MEANS["teacher"]
        )
    lead, ratio = teacher_em - student_em, teacher_ce / student_ce if student_ce > 0 else float("inf")
    ok = lead >= TEACHER_MIN_EM_LEAD and ratio <= TEACHER_MAX_CE_RATIO
    return Gate(
        "teacher",
        {"em_lead": lead, "ce_ratio": ratio},
        ok,
        f"seen-task EM teacher {teacher_em:.1f} vs student {student_em:.1f} ({lead:+.1f}, needs >= "
        f"+{TEACHER_MIN_EM_LEAD:g}); training CE {teacher_ce:.3f} vs {student_ce:.3f} ({ratio:.2f}x, needs <= "
        f"{TEACHER_MAX_CE_RATIO:g}x)",
        MEANS["teacher"],
    )


def terms_gate(ratios: dict[str, float] | None) -> Gate:
    if not ratios:
        return Gate(
            "terms", None, False, "not measured (no grad_ratio/* at step 0 in TAGI's metrics.jsonl)", MEANS["terms"]
        )
    lo, hi = RATIO_BAND
    bad = [k for k, v in ratios.items() if not lo <= v <= hi]
    shown = ", ".join(f"{k} {v:.3g}" for k, v in sorted(ratios.items()))
    return Gate(
        "terms",
        dict(ratios),
        not bad,
        f"step-0 gradient ratio to CE: {shown} (each needs [{lo:g}, {hi:g}])"
        + (f"; outside: {', '.join(sorted(bad))}" if bad else ""),
        MEANS["terms"],
    )


def swap_gate(cost_em: float | None) -> Gate:
    if cost_em is None:
        return Gate("swap", None, False, "not measured (diagnose.json of TAGI on dev missing)", MEANS["swap"])
    return Gate(
        "swap",
        cost_em,
        cost_em >= SWAP_MIN_EM,
        f"dev EM lost with another task's instruction (adapter and fused states): {cost_em:+.1f} "
        f"(needs >= {SWAP_MIN_EM:g})",
        MEANS["swap"],
    )


# -- reading a run directory ----------------------------------------------------------------------------------
def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _em(path: Path) -> float | None:
    r = _json(path / "results.json")
    return None if r is None else float(r["exact_match"])


def _records(path: Path) -> list[dict]:
    p = path / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


def training_ce(path: Path) -> float | None:
    """Mean CE of the last CE_TAIL logged steps of a run directory (its ``ce`` term; ``loss`` where it has none)."""
    vals = [r.get("ce", r.get("loss")) for r in _records(path)]
    tail = [v for v in vals if v is not None][-CE_TAIL:]
    return sum(tail) / len(tail) if tail else None


def step0_ratios(path: Path) -> dict[str, float] | None:
    """``grad_ratio/<term>`` of the first record that has any: the step-0 measurement (train.grad_ratio_every
    measures from step 0, and the step's record is the first logged)."""
    for r in _records(path):
        found = {k.split("/", 1)[1]: float(v) for k, v in r.items() if k.startswith("grad_ratio/") and v is not None}
        if found:
            return found
    return None


def gates(run: Path, seed: int = 0, teacher_eval: Path | None = None, teacher_run: Path | None = None) -> list[Gate]:
    """The four gates of a reproduce.sh run directory (paths as reproduce.sh writes them). ``teacher_eval`` /
    ``teacher_run``: the teacher's seen-task evaluation and training run (default: the LoRA teachers')."""
    dev, seen, tagi = run / "eval" / "dev", run / "eval" / "seen", run / f"s{seed}" / "ft_tagi"
    diag = _json(dev / "diagnose" / "diagnose.json")
    return [
        instruction_gate(_em(dev / "concat"), _em(dev / "no_instruction")),
        teacher_gate(
            _em(teacher_eval or seen / "teachers"),
            _em(seen / "tagi"),
            training_ce(teacher_run or run / "teachers"),
            training_ce(tagi),
        ),
        terms_gate(step0_ratios(tagi)),
        swap_gate(None if diag is None else float(diag["swap_cost_em"]["wrong_both"])),
    ]


def report(results: list[Gate], policy: str) -> dict:
    return {"policy": policy, "passed": all(g.passed for g in results), "gates": [asdict(g) for g in results]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="the scripts/reproduce.sh run directory")
    ap.add_argument("--seed", type=int, default=0, help="the seed whose TAGI run the gates read")
    ap.add_argument("--policy", choices=("stop", "warn"), default="stop", help="on a failed gate: exit 1, or warn")
    ap.add_argument("--teacher_eval", default=None, help="the teacher's seen-task evaluation dir (results.json)")
    ap.add_argument("--teacher_run", default=None, help="the teacher's training run dir (metrics.jsonl)")
    args = ap.parse_args(argv)
    run = Path(args.run)
    results = gates(
        run,
        args.seed,
        Path(args.teacher_eval) if args.teacher_eval else None,
        Path(args.teacher_run) if args.teacher_run else None,
    )
    out = report(results, args.policy)
    (run / "gates.json").write_text(json.dumps(out, indent=2) + "\n")
    for g in results:
        print(f"gate {g.name:<11} {'PASS' if g.passed else 'FAIL'}  {g.detail}")
        if not g.passed:
            print(f"  failing it means: {g.means}")
    failed = [g.name for g in results if not g.passed]
    if not failed:
        print(f"all gates pass -> {run / 'gates.json'}")
        return 0
    if args.policy == "warn":
        print(
            f"WARNING: gate(s) {', '.join(failed)} FAILED; GATES=warn: the seeds run anyway and the report marks "
            "the affected ablations as unreadable"
        )
        return 0
    print(
        f"gate(s) {', '.join(failed)} FAILED: stopping before the seed budget is spent. Fix what they measure, or "
        "re-run with GATES=warn to spend it anyway (every finished stage is kept and skipped)"
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
