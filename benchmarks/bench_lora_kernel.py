"""Forward+backward cost of per-task LoRA deltas on top of a frozen base linear.

Cases, each timed as one forward and one backward (grads of x, A, B; the base weight is frozen as in TAGI):
  1. base      y = x W^T                                   (the floor every adapter method pays)
  2. loop      base + a Python loop over tasks, two matmuls per task (peft-style mixed-adapter batches)
  3. torch     base + tagi_ds.ops.lora_delta_torch        (gather to [S, Lmax, d], two bmm)
  4. triton    base + tagi_kernels.triton_lora_delta      (one fused launch forward, three backward)
Ratios in the table are against case 1.

GPU (default grid: d in {2048, 4096, 8192}, r in {8, 16, 32, 64}, 8192 tokens, tasks in {1, 4, 16, 64}, bf16):
    python benchmarks/bench_lora_kernel.py [--d 4096 --r 16 --tasks 1 16 ...]
Timing: triton.testing.do_bench median (CUDA events). CPU: time.perf_counter median; ``--smoke`` runs a tiny
grid, case 4 only when TRITON_INTERPRET=1 is set (interpreter timings check the harness, not the kernel):
    TRITON_INTERPRET=1 python benchmarks/bench_lora_kernel.py --smoke
Results go to <out_dir>/<device-slug>_<YYYY-MM-DD>_lora_kernel[_<tag>].{json,md}. Needs ``pip install -e . --no-deps``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from tagi_ds.ops import lora_delta_torch  # noqa: E402

CASES = ("base", "loop", "torch", "triton")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FULL = {"d": [2048, 4096, 8192], "r": [8, 16, 32, 64], "tasks": [1, 4, 16, 64], "tokens": 8192, "reps": 0}
SMOKE = {"d": [32], "r": [4, 8], "tasks": [1, 4], "tokens": 40, "reps": 3}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny grid for CPU checks of the harness")
    p.add_argument("--d", type=int, nargs="+", help="hidden sizes (d_in = d_out)")
    p.add_argument("--r", type=int, nargs="+", help="LoRA ranks")
    p.add_argument("--tasks", type=int, nargs="+", help="tasks (segments) per batch")
    p.add_argument("--tokens", type=int, help="tokens per batch")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default cuda when available")
    p.add_argument("--reps", type=int, help="CPU repetitions per timing (median); GPU uses do_bench")
    p.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's; 1 with --smoke)")
    p.add_argument("--scale", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    common.add_output_args(p)
    args = p.parse_args(argv)
    grid = SMOKE if args.smoke else FULL
    for key in ("d", "r", "tasks", "tokens", "reps"):
        if getattr(args, key) is None:
            setattr(args, key, grid[key])
    if args.threads is None and args.smoke:
        args.threads = 1  # tiny shapes gain nothing from threads; spinning OpenMP workers on a busy host skew medians
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    return args


def triton_mode(device: str) -> str:
    """'gpu', 'interpreter' or 'skipped': case 4 needs CUDA, or the interpreter (set before triton loads)."""
    if device == "cuda":
        return "gpu"
    return "interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "skipped"


def random_offsets(tokens: int, tasks: int, gen: torch.Generator) -> torch.Tensor:
    """Uneven task segments, as a sampler mixing tasks produces: sorted uniform cut points (some may be empty)."""
    cuts = torch.sort(torch.randint(0, tokens + 1, (tasks - 1,), generator=gen)).values
    return torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.full((1,), tokens, dtype=torch.int64)])


def loop_delta(bounds: list[int]) -> Callable:
    """peft-style: one pair of matmuls per task; segment bounds are host ints, as in a Python loop over adapters."""

    def delta(x, A, B, offs, scale):
        parts = [(x[lo:hi] @ A[s].T) @ B[s].T for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])) if hi > lo]
        return torch.cat(parts) * scale

    return delta


def timer(device: str, reps: int) -> Callable[[Callable], float]:
    """Median milliseconds of fn()."""
    if device == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def cpu_time(fn):
        fn()  # warm-up (allocator, first-call paths)
        times = []
        for _ in range(max(reps, 1)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_time


def bench_point(d: int, r: int, tasks: int, args, deltas: dict[str, Callable | None], measure) -> dict:
    dev, dtype = args.device, DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(args.seed + d + 7 * r + 131 * tasks)
    offs = random_offsets(args.tokens, tasks, gen)
    x = torch.randn(args.tokens, d, generator=gen).to(dev, dtype).requires_grad_()
    W = (torch.randn(d, d, generator=gen) / d**0.5).to(dev, dtype)  # frozen base weight
    A = (torch.randn(tasks, r, d, generator=gen) / d**0.5).to(dev, dtype).requires_grad_()
    B = (torch.randn(tasks, d, r, generator=gen) / r**0.5).to(dev, dtype).requires_grad_()
    dy = torch.randn(args.tokens, d, generator=gen).to(dev, dtype)
    offs_dev = offs.to(dev)
    deltas = {**deltas, "loop": loop_delta(offs.tolist())}
    row = {"d": d, "r": r, "tasks": tasks, "segment_lengths_max": int((offs[1:] - offs[:-1]).max())}

    def step_fn(name):
        delta, inputs = deltas[name], ((x,) if name == "base" else (x, A, B))

        def step():
            y = F.linear(x, W)
            if delta is not None:
                y = y + delta(x, A, B, offs_dev, args.scale)
            torch.autograd.grad(y, inputs, dy)

        return step

    for name in CASES:
        if name != "base" and deltas.get(name) is None:
            row[f"{name}_ms"] = None
            continue
        step = step_fn(name)
        step()  # first call: Triton autotuning / compilation stays out of the timing
        row[f"{name}_ms"] = measure(step)
    if deltas.get("triton") is not None:
        with torch.no_grad():
            want = lora_delta_torch(x, A, B, offs_dev, args.scale).float()
            got = deltas["triton"](x, A, B, offs_dev, args.scale).float()
        row["triton_rel_err"] = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    for name in CASES[1:]:
        ms = row[f"{name}_ms"]
        row[f"{name}_x"] = None if ms is None else ms / row["base_ms"]
    return row


def to_markdown(result: dict) -> str:
    def cell(ms, ratio):
        return "—" if ms is None else f"{ms:.3f} ({ratio:.2f}x)"

    lines = [
        f"# LoRA delta kernel — {result['device']} — {result['date']}",
        "",
        f"forward+backward, {result['tokens']} tokens, {result['dtype']}, scale {result['scale']}; timer: "
        f"{result['timer']}; triton: {result['triton_mode']} (torch {result['torch']}, triton {result['triton']})",
        "",
    ]
    if result["triton_mode"] == "interpreter":
        lines += ["Triton timings come from the CPU interpreter: they check the harness, not the kernel.", ""]
    lines += [
        "| d | r | tasks | base ms | loop ms (x base) | torch ms (x base) | triton ms (x base) | triton rel err |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        err = row.get("triton_rel_err")
        lines.append(f"| {row['d']} | {row['r']} | {row['tasks']} | {row['base_ms']:.3f} | "
                     f"{cell(row['loop_ms'], row['loop_x'])} | {cell(row['torch_ms'], row['torch_x'])} | "
                     f"{cell(row['triton_ms'], row['triton_x'])} | {'—' if err is None else f'{err:.1e}'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    mode = triton_mode(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    deltas: dict[str, Callable | None] = {"base": None, "torch": lora_delta_torch, "triton": None}
    triton_version = "n/a"
    if mode != "skipped":
        import triton

        from tagi_kernels import triton_lora_delta

        deltas["triton"], triton_version = triton_lora_delta, triton.__version__
    measure = timer(args.device, args.reps)
    rows = []
    for d in args.d:
        for r in args.r:
            for tasks in args.tasks:
                rows.append(bench_point(d, r, tasks, args, deltas, measure))
                print(f"d={d} r={r} tasks={tasks}: " + ", ".join(
                    f"{c} {rows[-1][f'{c}_ms']:.3f} ms" for c in CASES if rows[-1][f"{c}_ms"] is not None),
                    file=sys.stderr, flush=True)
    result = {
        "benchmark": "lora_kernel",
        "device": common.device_name(args.device),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton_version,
        "triton_mode": mode,
        "dtype": args.dtype,
        "tokens": args.tokens,
        "scale": args.scale,
        "smoke": args.smoke,
        "cpu_threads": torch.get_num_threads(),
        "timer": "triton.testing.do_bench median" if args.device == "cuda" else f"perf_counter median of {args.reps}",
        "rows": rows,
    }
    table = to_markdown(result)
    common.emit(args, "lora_kernel", result, table, device=args.device)
    return result


if __name__ == "__main__":
    main()
