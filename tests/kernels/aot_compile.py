"""Compile the GPU variants of the LoRA kernels ahead of time for sm_90, without a GPU (no launch).

Run in a process without TRITON_INTERPRET (tests/kernels/test_gpu_compile.py does). It catches what the CPU
interpreter does not check: tl.dot shape and dtype rules, bf16 casts, constexpr branches, while loops around dots,
shared-memory use. Each variant is specialized as a real launch is: strides equal to 1 become constants (the
contiguous operand of each layout: A and x in forward, the B^T / A^T views in backward, dB^T's rank axis).
Prints one line per compiled variant; exits non-zero on the first failure. ``--all`` compiles every config of the
current autotune space (default: its first config; the space is the full one unless TAGI_KERNELS_TUNE=fixed).
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

from tagi_kernels import lora_kernels as lk

# fp16 takes bf16's code paths (16-bit operands, fp32 accumulation): compile its two shrinks only, to keep the test
# short (each variant costs ~1 s of CPU); bf16 and fp32 (IEEE dots) compile every variant.
FP16_SUBSET = (0, 1)
TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200
SMEM_LIMIT = 232448  # bytes of shared memory per block on sm_90


def signature(fn, types: dict[str, str], units: tuple[str, ...]) -> dict[str, str]:
    def kind(n):
        if n in types:
            return types[n]
        return "i32" if n.startswith("stride") and n not in units else "constexpr"

    return {n: kind(n) for n in fn.arg_names}


def compile_one(kernel, what: str, types: dict, constexprs: dict, config, units: tuple[str, ...] = ()) -> None:
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    consts = {**constexprs, **config.kwargs, **dict.fromkeys(units, 1)}
    src = ASTSource(fn, signature(fn, types, units), consts)
    compiled = triton.compile(src, target=TARGET, options={"num_warps": config.num_warps,
                                                           "num_stages": config.num_stages})
    shared = compiled.metadata.shared
    print(f"{fn.__name__} [{what}] {constexprs} {config.kwargs} smem={shared}")
    assert shared <= SMEM_LIMIT, f"{fn.__name__}: {shared} bytes of shared memory > {SMEM_LIMIT}"


def variants(dt: str):
    """(kernel, what, types, constexprs, unit strides) of every launch the op makes, for one input dtype."""
    p = "*" + dt
    prec = "ieee" if dt == "fp32" else "tf32"
    i32 = dict.fromkeys(("T", "S", "K", "N", "R", "D", "k_chunk", "n_hsplit", "span_n", "n_usplit", "n_split",
                         "numel"), "i32")
    bm = {"BLOCK_M": lk.BLOCK_M_GPU}
    shrink = {**i32, "X": p, "W1": p, "HP": "*fp32", "offs": "*i64"}
    yield lk.shrink_kernel, "H = x A^T", shrink, {**bm, "R_PAD": 64, "IN_PREC": prec}, ("stride_xk", "stride_wk")
    yield lk.shrink_kernel, "G = dY B", shrink, {**bm, "R_PAD": 16, "IN_PREC": prec}, ("stride_xk", "stride_wr")
    expand = {**i32, "HP": "*fp32", "W2": p, "Y": p, "offs": "*i64", "scale": "fp32"}
    for what, r_pad, add, units in (("y = H B^T", 64, False, ("stride_wr", "stride_yn")),
                                    ("y += H B^T", 16, True, ("stride_wr", "stride_yn")),
                                    ("dX = G A", 64, False, ("stride_wn", "stride_yn"))):
        yield lk.expand_kernel, what, expand, {**bm, "R_PAD": r_pad, "ADD": add, "IN_PREC": prec}, units
    reduce = {**i32, "UP": "*fp32", "V": p, "OUT": p, "offs": "*i64", "scale": "fp32"}
    yield (lk.seg_reduce_kernel, "dA = G^T x", reduce, {"R_PAD": 64, "IN_PREC": prec, "BLOCK_D": lk.BLOCK_D_GPU},
           ("stride_vd", "stride_od"))
    yield (lk.seg_reduce_kernel, "dB^T partials", {**reduce, "OUT": "*fp32"},
           {"R_PAD": 16, "IN_PREC": prec, "BLOCK_D": lk.BLOCK_D_GPU}, ("stride_vd", "stride_or"))
    yield (lk.sum_splits_kernel, "sum of partials", {**i32, "P": "*fp32", "OUT": p}, {"BLOCK": 1024},
           ("stride_or",))


def main(every_config: bool) -> None:
    assert not lk.INTERPRET, "run without TRITON_INTERPRET=1"
    print(f"tune={lk.TUNE} configs: shrink={len(lk.SHRINK_CONFIGS)} expand={len(lk.EXPAND_CONFIGS)} "
          f"seg_reduce={len(lk.SEG_REDUCE_CONFIGS)}")
    spaces = {lk.shrink_kernel: lk.SHRINK_CONFIGS, lk.expand_kernel: lk.EXPAND_CONFIGS,
              lk.seg_reduce_kernel: lk.SEG_REDUCE_CONFIGS}
    for dt in ("bf16", "fp16", "fp32"):
        for i, (kernel, what, types, constexprs, units) in enumerate(variants(dt)):
            if dt == "fp16" and i not in FP16_SUBSET:
                continue
            space = spaces.get(kernel, [triton.Config({}, num_warps=4, num_stages=1)])
            for config in space if every_config else space[:1]:
                compile_one(kernel, what, types, constexprs, config, units)


if __name__ == "__main__":
    main(every_config="--all" in sys.argv)
