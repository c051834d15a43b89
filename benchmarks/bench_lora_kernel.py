"""Forward+backward cost of per-task LoRA deltas on top of a frozen base linear, and their error against float64.

Cases, each one forward and one backward (grads of x, A, B; the base weight is frozen as in TAGI):
  base           y = x W^T                                        (the floor every adapter method pays)
  loop           base + a Python loop over tasks, two matmuls per task (peft-style mixed-adapter batches)
  torch          base + tagi_ds.ops.lora_delta_torch             (gather to [S, Lmax, d], two bmm)
  triton         base + tagi_ds.ops.lora_delta(impl="triton")    (the delta, then torch's add)
  triton_add     tagi_ds.ops.lora_delta_add_ into the base output (the expand adds in place)
  triton_linear  tagi_ds.ops.lora_linear                          (delta written, base GEMM added onto it)
  fused          tagi_ds.ops.lora_linear_fused(shrink="fused")    (one Triton GEMM per direction, LoRA inside,
                                                                   x A_s^T from the GEMM's own x tiles; issue 26)
  fused_split    tagi_ds.ops.lora_linear_fused(shrink="split")    (the same GEMM, x A_s^T by the split-K shrink)
Ratios are against ``base`` (cuBLAS) measured in the same run, on the same inputs.

Protocol (GPU). Input sets (x, W, A, B, dY) rotate from one repetition to the next, enough of them that together
they exceed 3x the L2 cache, so no repetition finds its inputs in L2. Before each phase, blocks of the outputs'
sizes are filled with NaN and freed (the caching allocator hands them to the op's outputs: a kernel that leaves a
tile unwritten shows up as NaN in the error check instead of reading the previous repetition's correct values) and
a 2x-L2 buffer is written (L2 flushed, also between forward and backward, as the other layers of a model would).
Forward and backward are timed separately with CUDA events behind a GPU sleep longer than the host takes to issue
the phase (capped at 20 ms), so ``ms`` is GPU time with the host's launch overhead hidden; the host's issue time is
reported beside it (``host ms``; a case whose host time exceeds its GPU time is host-bound when run alone). Median
of ``--reps``.
Error: the last repetition's outputs (y, dx, dA, dB) against float64 from the same (rounded) inputs, max abs error
over max abs truth, each of the four in the JSON (``<case>_err_y`` ...) and their max (``<case>_err``); NaN when an
output is non-finite.
Autotuning: the Triton kernels' autotune caches are cleared before every grid point, so each point tunes for its
own shape (the v1 kernels' keys omit the shape; a process that tuned once would reuse the first point's configs).
Floors: bytes over the device-to-device copy bandwidth measured at start-up (``copy_TBps`` in the JSON; on CPU, a
memcpy), not a datasheet figure. Partial results: the JSON and Markdown are rewritten after every grid point, so a
run cut short keeps the points it finished (``complete: false`` until the last one).

GPU (default grid: d in {2048, 4096, 8192}, r in {8, 16, 64}, tasks in {1, 4, 16, 64}, 8192 tokens, bf16):
    python benchmarks/bench_lora_kernel.py [--d 4096 --r 16 --tasks 1 16 ...]
CPU: time.perf_counter median over fwd+bwd; ``--smoke`` runs a tiny grid, the Triton cases only when
TRITON_INTERPRET=1 is set (interpreter timings check the harness, not the kernels):
    TRITON_INTERPRET=1 python benchmarks/bench_lora_kernel.py --smoke
Results go to <out_dir>/<device-slug>_<YYYY-MM-DD>_lora_kernel[_<tag>].{json,md}. Needs ``pip install -e . --no-deps``.
"""

from __future__ import annotations

import argparse
import datetime
import math
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

from tagi_ds import ops  # noqa: E402

CASES = ("base", "loop", "torch", "triton", "triton_add", "triton_linear", "fused", "fused_split")
TRITON_CASES = CASES[3:]
ERR_PARTS = ("y", "dx", "dA", "dB")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FULL = {"d": [2048, 4096, 8192], "r": [8, 16, 64], "tasks": [1, 4, 16, 64], "tokens": 8192, "reps": 20}
SMOKE = {"d": [32], "r": [4, 8], "tasks": [1, 4], "tokens": 40, "reps": 2}


# Defaults for --floors without a device: the H100's ~3.0 TB/s device copy (read + write counted) and ~800 TFLOP/s
# bf16 matmul (kernels/NOTES.md). A benchmark run replaces the bandwidth by the one it measures at start-up.
COPY_BYTES_PER_S = 3.0e12
MATMUL_FLOPS_PER_S = 800e12
# Passes over a [T, d] activation-sized tensor (x, y, dY or dX; one read or one write each) that each path makes in
# forward + backward, with L2 flushed between them (kernels/NOTES.md derives each count):
PASSES = {
    "ideal": 4,  # read x and dY, write y and dX: a LoRA that costs nothing beyond the tensors it must touch
    "triton_linear": 6,  # fwd: shrink reads x, expand writes y (the GEMM reads it in its epilogue); bwd: dY for G,
    #                      dX written (GEMM adds onto it), x for dA, dY for dB
    "triton_add": 10,  # fwd: x, y read + written in place; bwd: dY, dX, autograd's dX sum (2 reads 1 write), x, dY
    "triton": 12,  # triton_add + the delta written and re-read by torch's add (y + delta: 2 reads, 1 write)
    # fused, shrink from the GEMM's x tiles: y and dX written by the GEMMs themselves (counted in the base), dA
    # reads x, dB reads dY; its extra FLOPs (R_PAD / BLOCK_N of the GEMMs) are added in floors()
    "fused": 2,
    "fused_split": 4,  # the same + the split-K shrinks read x (forward) and dY (backward)
}
FUSED_BLOCK_N = 256  # the fused GEMM's widest column tile: each N tile recomputes its rows' x A_s^T


def floors(T: int, d: int, r: int, S: int, elt: int = 2, copy_bps: float = COPY_BYTES_PER_S) -> dict:
    """Computed floors (ms) of the base linear (FLOPs: y = x W^T and dX = dY W) and of each LoRA path (bytes: its
    activation passes, plus A and B read in forward and backward and dA, dB written, plus the fp32 r-wide
    intermediates H and G written and read; its FLOPs 12 T d r are below the bytes' time at every grid point)."""
    base = 4 * T * d * d / MATMUL_FLOPS_PER_S * 1e3
    extra = 6 * S * r * d * elt + 4 * T * pad16(r) * 4
    out = {"base_ms": base, "lora_flops_ms": 12 * T * d * r / MATMUL_FLOPS_PER_S * 1e3}
    for path, passes in PASSES.items():
        out[f"{path}_ms"] = max((passes * T * d * elt + extra) / copy_bps * 1e3, out["lora_flops_ms"])
    # Fused shrink: 2 GEMMs x (R_PAD / BLOCK_N) of their 2 T d d FLOPs recomputed per column tile, on tensor cores.
    out["fused_ms"] += 2 * 2 * T * d * d * pad16(r) / FUSED_BLOCK_N / MATMUL_FLOPS_PER_S * 1e3
    return out


def pad16(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def floors_markdown(grid: dict) -> str:
    T = grid["tokens"]
    lines = [
        f"Computed floors, T={T}, bf16, H100 ceilings ({COPY_BYTES_PER_S / 1e12:.1f} TB/s copy, "
        f"{MATMUL_FLOPS_PER_S / 1e12:.0f} TFLOP/s bf16 matmul): base = FLOPs of x W^T and dY W; each LoRA "
        "path = its bytes; x = (base + path) / base.",
        "",
        "| d | r | tasks | base ms | LoRA FLOPs us | ideal us (x) | linear us (x) | add_ us (x) | delta us (x) "
        "| fused us (x) | fused_split us (x) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in grid["d"]:
        for r in grid["r"]:
            for S in grid["tasks"]:
                f = floors(T, d, r, S)
                cells = [f"{f[f'{p}_ms'] * 1e3:.0f} ({1 + f[f'{p}_ms'] / f['base_ms']:.3f})" for p in PASSES]
                lines.append(
                    f"| {d} | {r} | {S} | {f['base_ms']:.3f} | {f['lora_flops_ms'] * 1e3:.1f} | "
                    + " | ".join(cells)
                    + " |"
                )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny grid for CPU checks of the harness")
    p.add_argument("--floors", action="store_true", help="print the computed floors of the grid and exit (no device)")
    p.add_argument("--d", type=int, nargs="+", help="hidden sizes (d_in = d_out)")
    p.add_argument("--r", type=int, nargs="+", help="LoRA ranks")
    p.add_argument("--tasks", type=int, nargs="+", help="tasks (segments) per batch")
    p.add_argument("--tokens", type=int, help="tokens per batch")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="base is always measured")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default cuda when available")
    p.add_argument("--reps", type=int, help="timed repetitions per case (median)")
    p.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's; 1 with --smoke)")
    p.add_argument("--scale", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    common.add_output_args(p)
    args = p.parse_args(argv)
    grid = SMOKE if args.smoke else FULL
    for key in ("d", "r", "tasks", "tokens", "reps"):
        if getattr(args, key) is None:
            setattr(args, key, grid[key])
    args.cases = ["base"] + [c for c in CASES[1:] if c in args.cases]
    if args.threads is None and args.smoke:
        args.threads = 1  # tiny shapes gain nothing from threads; spinning OpenMP workers on a busy host skew medians
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    return args


def triton_mode(device: str) -> str:
    """'gpu', 'interpreter' or 'skipped': the Triton cases need CUDA, or the interpreter (set before triton loads)."""
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


def case_forward(name: str, offs: torch.Tensor, bounds: list[int], scale: float) -> Callable:
    """``forward(inputs) -> y`` of one case; ``inputs`` holds x, W, A, B (x, A, B require grad)."""
    deltas = {
        "loop": loop_delta(bounds),
        "torch": ops.lora_delta_torch,
        "triton": lambda x, A, B, o, s: ops.lora_delta(x, A, B, o, s, impl="triton", check_offsets=False),
    }
    if name == "base":
        return lambda i: F.linear(i["x"], i["W"])
    if name == "triton_add":
        return lambda i: ops.lora_delta_add_(
            F.linear(i["x"], i["W"]), i["x"], i["A"], i["B"], offs, scale, impl="triton", check_offsets=False
        )
    if name == "triton_linear":
        return lambda i: ops.lora_linear(
            i["x"], i["W"], None, i["A"], i["B"], offs, scale, impl="triton", check_offsets=False
        )
    if name in ("fused", "fused_split"):
        shrink = "fused" if name == "fused" else "split"
        return lambda i: ops.lora_linear_fused(
            i["x"], i["W"], None, i["A"], i["B"], offs, scale, impl="triton", check_offsets=False, shrink=shrink
        )
    return lambda i: F.linear(i["x"], i["W"]) + deltas[name](i["x"], i["A"], i["B"], offs, scale)


def wrt(name: str, inputs: dict) -> tuple:
    return (inputs["x"],) if name == "base" else (inputs["x"], inputs["A"], inputs["B"])


def make_inputs(d: int, r: int, tasks: int, tokens: int, dtype, gen: torch.Generator) -> dict:
    """One input set, drawn on ``gen``'s device (a CPU draw of 8192 x 8192 takes ~1 s)."""

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, device=gen.device) * std).to(dtype)

    return {
        "x": randn(tokens, d).requires_grad_(),
        "W": randn(d, d, std=d**-0.5),  # W: the frozen base weight
        "A": randn(tasks, r, d, std=d**-0.5).requires_grad_(),
        "B": randn(tasks, d, r, std=r**-0.5).requires_grad_(),
        "dy": randn(tokens, d),
    }


class Harness:
    """Poisoning, L2 flushing and the two timers (GPU events behind a sleep; CPU perf_counter)."""

    def __init__(self, device: str, reps: int):
        self.device, self.reps, self.gpu = device, reps, device == "cuda"
        self.warmup = 2 if self.gpu else 1  # untimed repetitions per case (the first compiles / autotunes)
        self.l2 = torch.cuda.get_device_properties(0).L2_cache_size if self.gpu else 0
        self.flush_buf = torch.empty(max(2 * self.l2 // 4, 1), dtype=torch.float32, device=device)
        self.cycles_per_ms = self._calibrate_sleep() if self.gpu else 0.0

    def _calibrate_sleep(self) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # warm
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        torch.cuda.synchronize()
        return 10_000_000 / start.elapsed_time(end)

    def poison(self, shapes: list[tuple[int, ...]], dtype) -> None:
        """Fill blocks of the outputs' sizes with NaN and free them (the allocator reuses them), then flush L2."""
        blocks = [torch.full(s, float("nan"), dtype=dtype, device=self.device) for s in shapes for _ in range(2)]
        del blocks
        self.flush_buf.zero_()

    def run(self, fwd: Callable, bwd: Callable, sets: list[dict], shapes, dtype) -> tuple[float, float, tuple]:
        """(median ms, median host ms, outputs of the last repetition) of forward then backward."""
        host_fb = [0.0, 0.0]
        for i in range(self.warmup):
            out = self._once(fwd, bwd, sets[i % len(sets)], shapes, dtype, host_fb, None)
        sleep_ms = min(20.0, 2 * max(host_fb) + 0.05)
        gpu, host, events = [], [], []
        for i in range(self.reps):
            out = self._once(fwd, bwd, sets[i % len(sets)], shapes, dtype, host_fb, sleep_ms)
            host.append(sum(host_fb))
            events.append(out[-1])
        if self.gpu:
            torch.cuda.synchronize()
            gpu = [e0.elapsed_time(e1) + e2.elapsed_time(e3) for e0, e1, e2, e3 in events]
        return statistics.median(gpu or host), statistics.median(host), out[:-1]

    def _once(self, fwd, bwd, inputs, shapes, dtype, host_fb, sleep_ms):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if self.gpu else None
        outs = []
        for phase, fn in enumerate((lambda: fwd(inputs), lambda: bwd(outs[0], inputs))):
            self.poison(shapes, dtype)
            if self.gpu and sleep_ms is not None:
                torch.cuda._sleep(int(sleep_ms * self.cycles_per_ms))  # the host issues the phase meanwhile
            if self.gpu:
                ev[2 * phase].record()
            t0 = time.perf_counter()
            outs.append(fn())
            host_fb[phase] = (time.perf_counter() - t0) * 1e3
            if self.gpu:
                ev[2 * phase + 1].record()
        return outs[0], outs[1], ev


def float64_truth(inputs: dict, bounds: list[int], scale: float) -> list[torch.Tensor]:
    """y, dx, dA, dB of base + delta in float64 from the same rounded inputs, by the per-segment loop."""
    x, A, B = (inputs[k].detach().double().requires_grad_() for k in ("x", "A", "B"))
    y = F.linear(x, inputs["W"].double()) + loop_delta(bounds)(x, A, B, None, scale)
    return [y.detach(), *torch.autograd.grad(y, (x, A, B), inputs["dy"].double())]


def rel_errs(got: list[torch.Tensor], truth: list[torch.Tensor]) -> list[float]:
    """Per output (y, dx, dA, dB): max abs error over max abs truth; NaN for an output with a non-finite value."""
    return [
        math.nan
        if not torch.isfinite(g).all()
        else float((g.double() - t).abs().max() / t.abs().max().clamp_min(1e-30))
        for g, t in zip(got, truth)
    ]


def worst(errs: list[float]) -> float:
    return math.nan if any(math.isnan(e) for e in errs) else max(errs)


def reset_autotuners() -> int:
    """Clear every Triton autotune cache of tagi_kernels (so this grid point tunes for its own shape); returns how
    many autotuned kernels there are."""
    from triton.runtime.autotuner import Autotuner

    from tagi_kernels import fused_linear, lora_kernels

    tuners = [k for mod in (lora_kernels, fused_linear) for k in vars(mod).values() if isinstance(k, Autotuner)]
    for k in tuners:
        k.cache.clear()
    return len(tuners)


def measure_copy_bandwidth(device: str) -> float:
    """Device-to-device copy bandwidth in bytes/s, read + write counted (the floors' ceiling): median of 5 copies
    of a 1 GiB buffer on a GPU (64 MiB on CPU)."""
    n = (1 << 30) if device == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        if device == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            dst.copy_(src)
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    return 2 * n / statistics.median(times[1:])


def bench_point(d: int, r: int, tasks: int, args, harness: Harness) -> dict:
    dev, dtype = args.device, DTYPES[args.dtype]
    seed = args.seed + d + 7 * r + 131 * tasks
    offs = random_offsets(args.tokens, tasks, torch.Generator().manual_seed(seed))
    gen = torch.Generator(device=dev).manual_seed(seed)
    one = make_inputs(d, r, tasks, args.tokens, dtype, gen)
    set_bytes = sum(t.numel() * t.element_size() for t in one.values())
    n_sets = max(2, min(8, math.ceil(3 * harness.l2 / set_bytes)))
    sets = [one] + [make_inputs(d, r, tasks, args.tokens, dtype, gen) for _ in range(n_sets - 1)]
    offs_dev, bounds = offs.to(dev), offs.tolist()
    shapes = [(args.tokens, d), (args.tokens, d), (tasks, r, d), (tasks, d, r)]  # y, dx, dA, dB
    last, truth = sets[(args.reps - 1) % n_sets], None  # the inputs of the last repetition, whose outputs are checked
    row = {
        "d": d,
        "r": r,
        "tasks": tasks,
        "segment_lengths_max": int((offs[1:] - offs[:-1]).max()),
        "input_sets": n_sets,
    }
    if args.triton_mode != "skipped":
        reset_autotuners()
    for name in CASES:
        if name not in args.cases or (name in TRITON_CASES and args.triton_mode == "skipped"):
            row[f"{name}_ms"] = row[f"{name}_host_ms"] = row[f"{name}_err"] = None
            row.update({f"{name}_err_{p}": None for p in ERR_PARTS})
            continue
        fwd = case_forward(name, offs_dev, bounds, args.scale)
        ms, host_ms, (y, grads) = harness.run(
            fwd, lambda y, i, n=name: torch.autograd.grad(y, wrt(n, i), i["dy"]), sets, shapes, dtype
        )
        row[f"{name}_ms"], row[f"{name}_host_ms"] = ms, host_ms
        if name != "base":
            truth = truth or float64_truth(last, bounds, args.scale)
            errs = rel_errs([y, *grads], truth)
            row.update({f"{name}_err_{p}": e for p, e in zip(ERR_PARTS, errs)})
            row[f"{name}_err"] = worst(errs)
        del y, grads
    for name in CASES[1:]:
        ms = row[f"{name}_ms"]
        row[f"{name}_x"] = None if ms is None else ms / row["base_ms"]
    f = floors(args.tokens, d, r, tasks, torch.finfo(dtype).bits // 8, args.copy_bps)
    # Each path's computed floor, on this run's measured base and bandwidth.
    for path in ("triton", "triton_add", "triton_linear", "fused", "fused_split"):
        row[f"{path}_floor_x"] = 1 + f[f"{path}_ms"] / row["base_ms"]
    triton_ms = [row[f"{c}_ms"] for c in TRITON_CASES if row[f"{c}_ms"] is not None]
    row["best_triton_ms"] = min(triton_ms) if triton_ms else None
    return row


def to_markdown(result: dict) -> str:
    def ratio(row, name):
        return "—" if row.get(f"{name}_x") is None else f"{row[f'{name}_x']:.2f}"

    def fmt(v, spec):
        return "—" if v is None else format(v, spec)

    def errs(row, case):
        parts = [row.get(f"{case}_err_{p}") for p in ERR_PARTS]
        return "—" if any(e is None for e in parts) else " / ".join(f"{e:.1e}" for e in parts)

    lines = common.md_head("LoRA delta kernel", result, "CPU timings check the harness; they are not GPU numbers.") + [
        f"forward+backward, {result['tokens']} tokens, {result['dtype']}, scale {result['scale']}; timer: "
        f"{result['timer']}; triton: {result['triton_mode']} (torch {result['torch']}, triton {result['triton']}); "
        f"autotune: {result['autotune']}; copy bandwidth measured at start-up: {result['copy_TBps']:.2f} TB/s"
        f"{'' if result['complete'] else '; PARTIAL: the run stopped before the end of its grid'}. "
        "Cases as ms (x base, the cuBLAS frozen linear); linear = lora_linear (v1 kernels + cuBLAS), fused / "
        "fused_split = lora_linear_fused (one Triton GEMM per direction; shrink from its x tiles / split-K first); "
        "fused floor: the computed floor of fused on this run's base and bandwidth (kernels/NOTES.md); best: the "
        "fastest triton path; err: max relative error vs float64 of y / dx / dA / dB; host: ms the host takes to "
        "issue the best path's forward+backward.",
        "",
    ]
    if result["triton_mode"] == "interpreter":
        lines += ["Triton timings come from the CPU interpreter: they check the harness, not the kernels.", ""]
    lines += [
        "| d | r | tasks | base ms | loop x | torch x | triton x | add_ x | linear x | fused x | fused_split x "
        "| fused floor x | loop / best | torch / best | err triton (worst path) | err fused y/dx/dA/dB "
        "| err fused_split y/dx/dA/dB | err torch | host ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        best = row["best_triton_ms"]
        all_errs = [row[f"{c}_err"] for c in TRITON_CASES if row[f"{c}_err"] is not None]
        err = max(all_errs, key=lambda e: math.inf if math.isnan(e) else e) if all_errs else None
        fastest = min(
            (c for c in TRITON_CASES if row[f"{c}_ms"] is not None), key=lambda c: row[f"{c}_ms"], default=None
        )
        lines.append(
            f"| {row['d']} | {row['r']} | {row['tasks']} | {row['base_ms']:.3f} | {ratio(row, 'loop')} | "
            f"{ratio(row, 'torch')} | {ratio(row, 'triton')} | {ratio(row, 'triton_add')} | "
            f"{ratio(row, 'triton_linear')} | {ratio(row, 'fused')} | {ratio(row, 'fused_split')} | "
            f"{row['fused_floor_x']:.3f} | "
            f"{fmt(row['loop_ms'] / best if best and row['loop_ms'] else None, '.1f')} | "
            f"{fmt(row['torch_ms'] / best if best and row['torch_ms'] else None, '.1f')} | {fmt(err, '.1e')} | "
            f"{errs(row, 'fused')} | {errs(row, 'fused_split')} | {fmt(row['torch_err'], '.1e')} | "
            f"{fmt(row[f'{fastest}_host_ms'] if fastest else None, '.3f')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.floors:
        print(floors_markdown({"d": args.d, "r": args.r, "tasks": args.tasks, "tokens": args.tokens}), end="")
        return {}
    args.triton_mode = triton_mode(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    triton_version = "n/a"
    if args.triton_mode != "skipped":
        import triton

        import tagi_kernels  # noqa: F401  (fails here, not mid-grid, when the kernels cannot load)

        triton_version = triton.__version__
    harness = Harness(args.device, args.reps)
    args.copy_bps = measure_copy_bandwidth(args.device)
    gpu = args.device == "cuda"
    rows = []
    result = {
        "benchmark": "lora_kernel",
        "device": common.device_name(args.device),
        "device_kind": args.device,
        "device_label": common.device_name(args.device) if gpu else common.device_label(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton_version,
        "triton_mode": args.triton_mode,
        "tune": os.environ.get("TAGI_KERNELS_TUNE", "full"),
        "autotune": (
            f"caches reset before every point ({os.environ.get('TAGI_KERNELS_TUNE', 'full')} space)"
            if args.triton_mode != "skipped"
            else "n/a"
        ),
        "dtype": args.dtype,
        "tokens": args.tokens,
        "scale": args.scale,
        "smoke": args.smoke,
        "cpu_threads": torch.get_num_threads(),
        "l2_bytes": harness.l2,
        "copy_TBps": args.copy_bps / 1e12,
        "matmul_TFLOPs_assumed": MATMUL_FLOPS_PER_S / 1e12,
        "reps": args.reps,
        "timer": (
            f"CUDA events, fwd + bwd each behind a GPU sleep, L2 flushed, median of {args.reps}"
            if gpu
            else f"perf_counter median of {args.reps}"
        ),
        "complete": False,
        "rows": rows,
    }
    points = [(d, r, tasks) for d in args.d for r in args.r for tasks in args.tasks]
    for n, (d, r, tasks) in enumerate(points, 1):
        rows.append(bench_point(d, r, tasks, args, harness))
        print(
            f"d={d} r={r} tasks={tasks}: "
            + ", ".join(f"{c} {rows[-1][f'{c}_ms']:.3f} ms" for c in CASES if rows[-1][f"{c}_ms"] is not None),
            file=sys.stderr,
            flush=True,
        )
        result["complete"] = n == len(points)
        if not args.no_save and not result["complete"]:  # partial results after every point (a timeout keeps them)
            common.save_results(
                args.out_dir,
                common.result_name("lora_kernel", args.tag),
                result,
                to_markdown(result),
                device=args.device,
                quiet=True,
            )
    common.emit(args, "lora_kernel", result, to_markdown(result), device=args.device)
    return result


if __name__ == "__main__":
    main()
