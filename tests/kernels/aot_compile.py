"""Compile the GPU variants of the LoRA kernels ahead of time for sm_90, without a GPU (no launch).

Run in a process without TRITON_INTERPRET (tests/kernels/test_gpu_compile.py does). It catches what the CPU
interpreter does not check: tl.dot shape and dtype rules, bf16 casts, constexpr branches, while loops around dots,
shared-memory use. Each variant is specialized as a real launch is: strides equal to 1 become constants (the
contiguous operand of each layout: A and x in forward, the B^T / A^T views in backward, dB^T's rank axis).
Prints one line per compiled variant (shared memory from Triton's metadata, registers per thread from cuobjdump);
exits non-zero on the first failure. The fused adapted linear's kernel compiles in every dtype (issue 26).
``--all`` compiles every config of the
current autotune space (default: its first config; the space is the full one unless TAGI_KERNELS_TUNE=fixed).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

from tagi_kernels import fused_linear as fl
from tagi_kernels import lora_kernels as lk

# fp16 takes bf16's code paths (16-bit operands, fp32 accumulation): compile its two shrinks only, to keep the test
# short (each variant costs ~1 s of CPU); bf16 and fp32 (IEEE dots) compile every variant.
FP16_SUBSET = (0, 1)
FUSED_FP16_SUBSET = (0,)  # the fused forward with bias; fp16 shares bf16's paths otherwise
TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200
SMEM_LIMIT = 232448  # bytes of shared memory per block on sm_90


def signature(fn, types: dict[str, str], units: tuple[str, ...]) -> dict[str, str]:
    def kind(n):
        if n in types:
            return types[n]
        return "i32" if n.startswith("stride") and n not in units else "constexpr"

    return {n: kind(n) for n in fn.arg_names}


def aligned(fn, sig: dict[str, str]) -> dict:
    """Divisibility attributes a real launch gives: pointers 16-byte aligned and integer arguments divisible by 16
    (model shapes and their strides are; ``do_not_specialize`` ones get none). Without them the compiler cannot
    issue async copies, does not pipeline the K loop, and reports one stage's shared memory whatever num_stages
    says (the figures printed before 2026-12-07 were those)."""
    free = set(fn.do_not_specialize)
    return {
        (i,): [["tt.divisibility", 16]]
        for i, (n, t) in enumerate(sig.items())
        if t.startswith("*") or (t == "i32" and n not in free)
    }


def compile_one(kernel, what: str, types: dict, constexprs: dict, config, units: tuple[str, ...] = ()) -> None:
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    consts = {**constexprs, **config.kwargs, **dict.fromkeys(units, 1)}
    sig = signature(fn, types, units)
    src = ASTSource(fn, sig, consts, aligned(fn, sig))
    compiled = triton.compile(
        src, target=TARGET, options={"num_warps": config.num_warps, "num_stages": config.num_stages}
    )
    shared = compiled.metadata.shared
    print(
        f"{fn.__name__} [{what}] {constexprs} {config.kwargs} warps={config.num_warps} "
        f"stages={config.num_stages} smem={shared} regs={registers(compiled)}"
    )
    assert shared <= SMEM_LIMIT, f"{fn.__name__}: {shared} bytes of shared memory > {SMEM_LIMIT}"


def registers(compiled) -> str:
    """Registers per thread of the compiled cubin, from cuobjdump (Triton's bundled copy); '?' if it cannot say."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        try:
            out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, timeout=300).stdout
        except (OSError, subprocess.SubprocessError):
            return "?"
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)  # STACK > 0: registers spilled to local memory
    return f"{m.group(1)} stack={m.group(2)}" if m else "?"


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def fused_variants(dt: str):
    """The fused adapted linear's launches (issue 26): forward with the shrink fused (bias, H stored for dB) or read
    from split-K partials, and the dgrad GEMM on the W^T / B^T / A^T views (G stored for dA), ranks 16 and 64."""
    p = "*" + dt
    prec = "ieee" if dt == "fp32" else "tf32"
    types = {
        **dict.fromkeys(("T", "S", "N", "K", "R", "n_hsplit"), "i32"),
        "X": p,
        "W": p,
        "BIAS": p,
        "L1": p,
        "L2": p,
        "HP": "*fp32",
        "HOUT": "*fp32",
        "Y": p,
        "offs": "*i64",
        "scale": "fp32",
    }
    fwd_units = ("stride_xk", "stride_wk", "stride_1k", "stride_2r", "stride_yn")
    bwd_units = ("stride_xk", "stride_wn", "stride_1r", "stride_2n", "stride_yn")
    for what, r_pad, fuse, bias, store, units in (
        ("y = xW^T + b + s(xA^T)B^T, fused shrink", 16, True, True, True, fwd_units),
        ("y, fused shrink, r64", 64, True, False, True, fwd_units),
        ("y, split shrink", 64, False, False, False, fwd_units),
        ("dX = dY W + s(dY B)A, fused shrink", 16, True, False, True, bwd_units),
        ("dX, fused shrink, r64", 64, True, False, True, bwd_units),
        ("dX, split shrink", 16, False, False, False, bwd_units),
    ):
        yield (
            what,
            types,
            {"R_PAD": r_pad, "FUSE_SHRINK": fuse, "STORE_H": store, "HAS_BIAS": bias, "IN_PREC": prec},
            units,
        )


def variants(dt: str):
    """(kernel, what, types, constexprs, unit strides) of every launch the op makes, for one input dtype."""
    p = "*" + dt
    prec = "ieee" if dt == "fp32" else "tf32"
    i32 = dict.fromkeys(
        ("T", "S", "K", "N", "R", "D", "k_chunk", "n_hsplit", "span_n", "n_usplit", "n_split", "numel"), "i32"
    )
    bm = {"BLOCK_M": lk.BLOCK_M_GPU}
    shrink = {**i32, "X": p, "W1": p, "HP": "*fp32", "offs": "*i64"}
    yield lk.shrink_kernel, "H = x A^T", shrink, {**bm, "R_PAD": 64, "IN_PREC": prec}, ("stride_xk", "stride_wk")
    yield lk.shrink_kernel, "G = dY B", shrink, {**bm, "R_PAD": 16, "IN_PREC": prec}, ("stride_xk", "stride_wr")
    expand = {**i32, "HP": "*fp32", "W2": p, "Y": p, "offs": "*i64", "scale": "fp32"}
    for what, r_pad, add, units in (
        ("y = H B^T", 64, False, ("stride_wr", "stride_yn")),
        ("y += H B^T", 16, True, ("stride_wr", "stride_yn")),
        ("dX = G A", 64, False, ("stride_wn", "stride_yn")),
    ):
        yield lk.expand_kernel, what, expand, {**bm, "R_PAD": r_pad, "ADD": add, "IN_PREC": prec}, units
    reduce = {**i32, "UP": "*fp32", "V": p, "OUT": p, "offs": "*i64", "scale": "fp32"}
    yield (
        lk.seg_reduce_kernel,
        "dA = G^T x",
        reduce,
        {"R_PAD": 64, "IN_PREC": prec, "BLOCK_D": lk.BLOCK_D_GPU},
        ("stride_vd", "stride_od"),
    )
    yield (
        lk.seg_reduce_kernel,
        "dB^T partials",
        {**reduce, "OUT": "*fp32"},
        {"R_PAD": 16, "IN_PREC": prec, "BLOCK_D": lk.BLOCK_D_GPU},
        ("stride_vd", "stride_or"),
    )
    yield (lk.sum_splits_kernel, "sum of partials", {**i32, "P": "*fp32", "OUT": p}, {"BLOCK": 1024}, ("stride_or",))


def main(every_config: bool) -> None:
    assert not lk.INTERPRET, "run without TRITON_INTERPRET=1"
    print(
        f"tune={lk.TUNE} configs: shrink={len(lk.SHRINK_CONFIGS)} expand={len(lk.EXPAND_CONFIGS)} "
        f"seg_reduce={len(lk.SEG_REDUCE_CONFIGS)}"
    )
    spaces = {
        lk.shrink_kernel: lk.SHRINK_CONFIGS,
        lk.expand_kernel: lk.EXPAND_CONFIGS,
        lk.seg_reduce_kernel: lk.SEG_REDUCE_CONFIGS,
    }
    for dt in ("bf16", "fp16", "fp32"):
        for i, (kernel, what, types, constexprs, units) in enumerate(variants(dt)):
            if dt == "fp16" and i not in FP16_SUBSET:
                continue
            space = spaces.get(kernel, [triton.Config({}, num_warps=4, num_stages=1)])
            if kernel is lk.shrink_kernel and len(space) > 1:  # as the autotuner prunes it, by dtype
                space = lk.prune_shrink(space, {"X": torch.empty(0, dtype=TORCH_DTYPES[dt])}, **constexprs)
            for config in space if every_config else space[:1]:
                compile_one(kernel, what, types, constexprs, config, units)
        for i, (what, types, constexprs, units) in enumerate(fused_variants(dt)):
            if dt == "fp16" and i not in FUSED_FP16_SUBSET:
                continue
            # The configs the autotuner would try for this dtype and rank (fixed tuning: the first that fits).
            space = fl.prune_fused(fl.FUSED_CONFIGS, {"X": torch.empty(0, dtype=TORCH_DTYPES[dt])}, **constexprs)
            pruned = len(fl.FUSED_CONFIGS) - len(space)
            if pruned and fl.TUNE == "full":
                print(f"fused_linear_kernel [{what}] {dt}: {pruned} config(s) pruned over {lk.SMEM_LIMIT} B")
            for config in space if every_config else space[:1]:
                compile_one(fl.fused_linear_kernel, what, types, constexprs, config, units)


if __name__ == "__main__":
    main(every_config="--all" in sys.argv)
