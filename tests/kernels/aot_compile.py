"""Compile the GPU variants of the LoRA kernels ahead of time for sm_90, without a GPU (no launch).

Run in a process without TRITON_INTERPRET (tests/kernels/test_gpu_compile.py does). It catches what the CPU
interpreter does not check: tl.dot shape and dtype rules, bf16 casts, constexpr branches, shared-memory use.
Prints one line per compiled variant; exits non-zero on the first failure.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tagi_kernels import lora_kernels as lk

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200
SMEM_LIMIT = 232448  # bytes of shared memory per block on sm_90


def signature(fn, types: dict[str, str]) -> dict[str, str]:
    return {n: types.get(n, "i32" if n.startswith("stride") else "constexpr") for n in fn.arg_names}


def compile_one(kernel, types, constexprs, config):
    fn = kernel.fn
    src = ASTSource(fn, signature(fn, types), {**constexprs, **config.kwargs})
    compiled = triton.compile(src, target=TARGET, options={"num_warps": config.num_warps,
                                                           "num_stages": config.num_stages})
    shared = compiled.metadata.shared
    print(f"{fn.__name__} {types.get('X', types.get('V'))} {constexprs} {config.kwargs} smem={shared}")
    assert shared <= SMEM_LIMIT, f"{fn.__name__}: {shared} bytes of shared memory > {SMEM_LIMIT}"


def main(every_config: bool) -> None:
    assert not lk.INTERPRET, "run without TRITON_INTERPRET=1"
    fused = lk.fused_lora_kernel.configs if every_config else lk.fused_lora_kernel.configs[-1:]
    outer = lk.seg_outer_kernel.configs if every_config else lk.seg_outer_kernel.configs[-1:]
    for dt in ("bf16", "fp16", "fp32"):
        p = "*" + dt
        prec = "ieee" if dt == "fp32" else "tf32"
        types = {"X": p, "W1": p, "W2": p, "Y": p, "H": "*fp32", "blk_seg": "*i32", "blk_row": "*i32",
                 "offs": "*i64", "K": "i32", "N": "i32", "R": "i32", "scale": "fp32"}
        for config in fused:
            # Forward / dX (writes Y and H, widest rank) and the dA-only backward (no Y, smallest rank).
            for r_pad, write_y in ((64, True), (16, False)):
                compile_one(lk.fused_lora_kernel, types, {"BLOCK_M": 64, "R_PAD": r_pad, "WRITE_Y": write_y,
                                                          "STORE_H": True, "IN_PREC": prec}, config)
        types = {"U": "*fp32", "V": p, "OUT": p, "offs": "*i64", "D": "i32", "R": "i32", "n_split": "i32",
                 "scale": "fp32"}
        for config in outer:
            compile_one(lk.seg_outer_kernel, types, {"R_PAD": 64, "IN_PREC": prec}, config)
            compile_one(lk.seg_outer_kernel, {**types, "OUT": "*fp32"}, {"R_PAD": 16, "IN_PREC": prec}, config)


if __name__ == "__main__":
    main(every_config="--all" in sys.argv)
