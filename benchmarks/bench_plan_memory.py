"""The memory planner against a measured step: predicted vs measured peak memory of one device.

For each recipe, with gradient checkpointing off and on: ``tagi_ds.plan``'s prediction for one plain-torch
stage-2 training step (mode tagi, teacher KL + param-MSE; ``python -m tagi_ds.plan --stage none``), next to
``tagi_ds.plan.measure_step``'s measurement of that same step on this device. On CUDA the measurement is
``torch.cuda.max_memory_allocated``. On CPU it is the tracked tensor peak, which is the planner's own
definition. The ratio is predicted / measured, and the planner's target is within 10%. A case the planner
says does not fit this device's memory is listed as skipped and not run. The baseline of this benchmark is
the measured step: there is nothing to time.

    python benchmarks/bench_plan_memory.py                      # GPU: t5-xl t5-xxl llama-7b; CPU: tiny tiny-llama
    python benchmarks/bench_plan_memory.py --recipe t5-xl --micro_batch 2 --seq_len 512
    python benchmarks/bench_plan_memory.py --smoke --out_dir /tmp/r   # CPU harness check, tiny shapes
Results: <out_dir>/<device-slug>_<YYYY-MM-DD>_plan_memory[_<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from tagi_ds import plan  # noqa: E402
from tagi_ds.plan.inputs import GiB  # noqa: E402
from tagi_ds.recipes import RECIPES  # noqa: E402

PARTS = ("backbone", "hypernet", "optimizer", "activations")  # the planner's main terms, shown per row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--recipe",
        nargs="+",
        choices=list(RECIPES),
        help=f"default: GPU {' '.join(common.GPU_RECIPES)}, CPU {' '.join(common.CPU_RECIPES)}",
    )
    p.add_argument("--smoke", action="store_true", help="tiny recipe at tiny shapes: checks the harness")
    p.add_argument("--micro_batch", type=int, help="examples per step (default: the planner's default)")
    p.add_argument("--seq_len", type=int, help="input tokens (default: data.max_source_length)")
    p.add_argument("--target_len", type=int, help="target tokens (default: data.max_target_length)")
    p.add_argument("--instr_len", type=int, help="instruction tokens (default: data.max_instruction_length)")
    p.add_argument("--teacher_rows", type=int, default=60, help="teacher bank rows")
    p.add_argument(
        "--checkpointing",
        nargs="+",
        choices=["off", "on"],
        default=["off", "on"],
        help="gradient checkpointing settings to run",
    )
    p.add_argument(
        "--gpu_mem_gb", type=float, help="device memory the planner checks against (default: this GPU's total; CPU: 80)"
    )
    common.add_run_args(p)
    a, gpu = common.parse_run_args(p, argv)
    for key in ("micro_batch", "seq_len", "target_len", "instr_len", "teacher_rows"):
        v = getattr(a, key)
        if v is not None and v <= 0:
            p.error(f"--{key} must be > 0, got {v}")
    if a.smoke:
        a.micro_batch, a.seq_len, a.target_len, a.instr_len = (
            a.micro_batch or 4,
            a.seq_len or 32,
            a.target_len or 8,
            a.instr_len or 32,
        )
        a.checkpointing = ["off"]
    if a.gpu_mem_gb is None:
        a.gpu_mem_gb = torch.cuda.get_device_properties(0).total_memory / GiB if gpu else 80.0
    return a


def run_case(args, recipe: str, checkpointing: bool) -> dict:
    p = plan.PlanInput(
        model=recipe,
        nodes=1,
        gpus_per_node=1,
        stage="none",
        gpu_mem_gb=args.gpu_mem_gb,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        target_len=args.target_len,
        instr_len=args.instr_len,
        teacher_rows=args.teacher_rows,
        gradient_checkpointing=checkpointing,
    )
    predicted = plan.plan(p)
    mem = predicted["memory"]
    row = {
        "recipe": recipe,
        "checkpointing": checkpointing,
        "shapes": predicted["shapes"],
        "precision": predicted["input"]["precision"],
        "predicted": mem,
        "usable": predicted["usable"],
        "status": "ok",
    }
    if not predicted["fits"]:
        row["status"] = f"skipped: predicted {mem['total'] / GiB:.1f} GiB > usable {predicted['usable'] / GiB:.1f} GiB"
        return row
    common.release_memory()
    torch.manual_seed(args.seed)
    try:
        measured = plan.measure_step(p, seed=args.seed)
    except torch.OutOfMemoryError as err:
        row["status"] = f"skipped: out of memory when measured ({str(err).splitlines()[0][:120]})"
        return row
    finally:
        common.release_memory()
    row["measured"] = measured
    row["ratio"] = mem["total"] / measured["peak"]
    print(
        f"  {recipe} ckpt={'on' if checkpointing else 'off'}: predicted {common.fmt_bytes(mem['total'])}, "
        f"measured {common.fmt_bytes(measured['peak'])} ({100 * (row['ratio'] - 1):+.1f}%)",
        file=sys.stderr,
        flush=True,
    )
    return row


def to_markdown(result: dict) -> str:
    lines = common.md_head(
        "Memory planner vs a measured step",
        result,
        "**CPU results**: the measured peak is the tracked tensor peak (live tensor storages + the step's "
        "high-water mark), the planner's own definition; at tiny shapes these check the planner's formulas, "
        "not a GPU's allocator.",
        "Measured: torch.cuda.max_memory_allocated over one training step after a warm-up step (optimizer "
        "state allocated), one process, no DeepSpeed (`--stage none`).",
    )
    v = result["versions"]
    lines += [
        f"torch {v['torch']}, transformers {v['transformers']}; planner checks against "
        f"{result['gpu_mem_gb']:.1f} GiB; ratio = predicted / measured (target: within 10%)",
        "",
        "| recipe | ckpt | B / K | input / target / instruction | precision | "
        + " | ".join(f"pred. {k}" for k in PARTS)
        + " | predicted | measured | ratio |",
        "|" + "---|" * (8 + len(PARTS)),
    ]
    for r in result["rows"]:
        sh = r["shapes"]
        cells = [
            r["recipe"],
            "on" if r["checkpointing"] else "off",
            f"{sh['micro_batch']} / {sh['tasks']}",
            f"{sh['seq_len']} / {sh['target_len']} / {sh['instr_len']}",
            r["precision"],
        ]
        cells += [common.fmt_bytes(r["predicted"].get(k)) for k in PARTS]
        cells.append(common.fmt_bytes(r["predicted"]["total"]))
        if r["status"] == "ok":
            cells += [common.fmt_bytes(r["measured"]["peak"]), f"{r['ratio']:.3f}"]
        else:
            cells += [r["status"], "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {
        "benchmark": "plan_memory",
        "device": common.device_name(),
        "device_kind": common.device_kind(),
        "device_label": common.device_label(),
        "date": datetime.date.today().isoformat(),
        "versions": common.versions(),
        "smoke": args.smoke,
        "gpu_mem_gb": args.gpu_mem_gb,
        "rows": [],
    }
    for recipe in args.recipe:
        print(f"{recipe}:", file=sys.stderr, flush=True)
        for ck in args.checkpointing:
            result["rows"].append(run_case(args, recipe, ck == "on"))
    table = to_markdown(result)
    common.emit(args, "plan_memory", result, table)
    return result


if __name__ == "__main__":
    main()
