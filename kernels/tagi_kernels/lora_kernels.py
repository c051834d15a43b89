"""Triton kernels behind :mod:`tagi_kernels.lora_delta` (shapes and the backward derivation live there).

Tokens are tiled in plain ``BLOCK_M`` row tiles (no per-segment padding, no block table): a program finds the
segment of its first row by a binary search over ``offs`` and walks the segments its tile touches, masking rows
to each one in turn. Rows of one segment see only that segment's weights; every row belongs to one segment, so
the per-segment contributions never overlap.

``shrink_kernel``   ``HP[k, m, :] = X[m, K-chunk k] @ W1[s(m), :, K-chunk k]^T``   (split-K partials, fp32)
    ``W1 [S, R, K]``. One program per (row tile, K chunk): the shrink is computed once per token block (not once per
    output span), and the K split gives enough programs when there are few tokens per SM. The consumer sums the
    ``KSPLIT`` partials in a fixed order, so the split costs no atomics and no extra launch.
``expand_kernel``   ``Y[m, n] (+)= scale * round(sum_k HP[k, m, :]) @ W2[s(m), n, :]^T``
    ``W2 [S, N, R]``. One program per (row tile, span of output columns). ``ADD`` reads ``Y`` and adds into it (the
    expand as an epilogue on an existing output, e.g. the base linear's); otherwise it writes ``Y``.
``seg_reduce_kernel``  ``OUT[c, s, :, d] = scale * sum_{t in chunk c of s} U[t, :]^T V[t, d]``, ``U = sum_k UP[k]``
    The weight gradients as a segment-grouped GEMM: one program owns one ``[R, BLOCK_D]`` tile of one token chunk of
    one segment and walks its tokens in order (deterministic, no atomics). With few tasks each segment's tokens are
    split into chunks (so one task still fills the SMs) and ``sum_splits_kernel`` adds the fp32 partials in a fixed
    order. ``dA = (U=G, V=x)``, ``dB^T = (U=H, V=dY)`` (written through the strides of ``dB``).

Autotuning: the keys hold the rank bucket, the ADD flag and one weight stride (1, or r for backward's transposed
views), plus the dtypes, never T, S or d, so a model compiles each kernel a handful of times whatever its batch
shapes; the launch
geometry that depends on the shape (split-K, column span, token chunks) is picked by the launcher at run time and
passed as plain ints. ``TAGI_KERNELS_TUNE=fixed`` leaves one config per kernel (the GPU test stage sets it: each
specialization then compiles once, not once per config).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton picks interpreter mode from this variable when a kernel is decorated; mirror it so that interpreter
# runs (CPU tests) use one small config instead of benchmarking a GPU search space they cannot use.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TUNE = os.environ.get("TAGI_KERNELS_TUNE", "full")
if TUNE not in ("full", "fixed"):
    raise ValueError(f"TAGI_KERNELS_TUNE must be 'full' or 'fixed', got {TUNE!r}")

# Smallest tile edge handed to tl.dot (tensor cores need M, N, K >= 16).
MIN_DOT = 16
# Row tile of all kernels on a GPU (fixed, not tuned: the launch geometry is planned from it).
BLOCK_M_GPU = 64
# Column tile of the weight-gradient reduction (fixed for the same reason).
BLOCK_D_GPU = 128
# K chunks of the split shrink are multiples of this (every BLOCK_K of the space divides it).
K_CHUNK_ALIGN = 256


# Per kernel: (config names, interpreter config, full space). A config is (*values of names, num_warps, num_stages);
# the fixed space (TAGI_KERNELS_TUNE=fixed) is the full space's first config, so compiling one covers the other.
SPACES = {
    "shrink": (("BLOCK_K",), (16, 1, 1), [(128, 4, 3), (64, 4, 4), (256, 8, 3)]),
    "expand": (("BLOCK_N",), (16, 1, 1), [(128, 4, 3), (64, 4, 3), (256, 8, 3)]),
    "seg_reduce": (("BLOCK_M",), (16, 1, 1), [(64, 4, 3), (32, 4, 4), (128, 8, 3)]),
}


def configs(kernel: str) -> list[triton.Config]:
    """The autotune space of ``kernel`` for this process: interpreter, fixed (test flag) or full."""
    names, interp, full = SPACES[kernel]
    space = [interp] if INTERPRET else full[:1] if TUNE == "fixed" else full
    return [triton.Config(dict(zip(names, c[:-2])), num_warps=c[-2], num_stages=c[-1]) for c in space]


SHRINK_CONFIGS, EXPAND_CONFIGS, SEG_REDUCE_CONFIGS = configs("shrink"), configs("expand"), configs("seg_reduce")
SMEM_LIMIT = 232448  # bytes of shared memory per block on sm_90 (H100 / H200)


def prune_shrink(configs, named_args, **kwargs):
    """Drop shrink configs whose buffered x and W1 tiles exceed sm_90's shared memory for this call's dtype (the fp32
    BLOCK_K = 256 config at rank 64 needs 262144 B; the same config in bf16 fits). The estimate, ``num_stages``
    buffers of both tiles, is conservative; tests/kernels/aot_compile.py prints the compiler's figure."""
    elt, r_pad = named_args["X"].element_size(), kwargs["R_PAD"]

    def smem(c):
        return c.num_stages * (BLOCK_M_GPU * c.kwargs["BLOCK_K"] + c.kwargs["BLOCK_K"] * r_pad) * elt

    return [c for c in configs if smem(c) <= SMEM_LIMIT] or [min(configs, key=smem)]


@triton.jit
def _segment_of(offs, S, row):
    """Largest s in [0, S) with offs[s] <= row: the segment holding ``row`` (empty segments are stepped over,
    since offs[s + 1] > row for that s). log2(S) scalar loads."""
    lo = tl.full((), 0, tl.int32)
    hi = lo + S
    while hi - lo > 1:
        mid = (lo + hi) // 2
        go_right = tl.load(offs + mid) <= row
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    return lo


@triton.jit
def _row_tile(T, BLOCK_M: tl.constexpr):
    """Row tile of program_id(0): first row, one past its last row, its rows (int32 and int64 for addressing)."""
    m0 = tl.program_id(0) * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    return m0, tl.minimum(m0 + BLOCK_M, T), rows, rows.to(tl.int64)


@triton.autotune(
    configs=SHRINK_CONFIGS, key=["R_PAD", "stride_wk"], prune_configs_by={"early_config_prune": prune_shrink}
)
@triton.jit(do_not_specialize=["T", "S", "R", "k_chunk"])
def shrink_kernel(
    X,
    W1,
    HP,
    offs,  # [T, K], [S, R, K] (any strides), fp32 [KSPLIT, T, R_PAD], int64 [S+1]
    T,
    S,
    K,
    R,
    k_chunk,
    stride_xm,
    stride_xk,
    stride_ws,
    stride_wr,
    stride_wk,
    stride_hs,
    stride_hm,
    BLOCK_M: tl.constexpr,
    R_PAD: tl.constexpr,
    IN_PREC: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    k_split = tl.program_id(1)
    m0, m_end, rows, rows64 = _row_tile(T, BLOCK_M)
    r_idx = tl.arange(0, R_PAD)
    r_mask = r_idx < R  # rank padded to R_PAD >= 16 with zeros: padded columns of H stay exactly 0
    k_lo = k_split * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, K)

    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    seg = _segment_of(offs, S, m0)
    seg_lo = tl.load(offs + seg)
    while seg_lo < m_end:
        seg_hi = tl.load(offs + seg + 1)
        if seg_hi > seg_lo:  # empty segments own no rows: skip their weights
            # Rows of other segments load as 0, so their contributions to this segment's dot are exact zeros.
            row_mask = (rows >= seg_lo) & (rows < seg_hi)
            w_base = W1 + seg.to(tl.int64) * stride_ws + r_idx[None, :] * stride_wr
            for k0 in range(k_lo, k_hi, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_mask = ks < k_hi
                x = tl.load(
                    X + rows64[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                w = tl.load(w_base + ks[:, None] * stride_wk, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
                acc = tl.dot(x, w, acc, input_precision=IN_PREC)  # [BLOCK_M, R_PAD], fp32 accumulation
        seg += 1
        seg_lo = seg_hi
    tl.store(HP + k_split * stride_hs + rows64[:, None] * stride_hm + r_idx[None, :], acc, mask=(rows < T)[:, None])


@triton.jit
def _sum_partials(P, n_split, stride_ps, rows64, row_mask, stride_pm, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """sum_k P[k, rows, :] in the order k = 0, 1, ... (fp32 [BLOCK_M, R_PAD]); masked rows read 0."""
    r_idx = tl.arange(0, R_PAD)
    total = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k in range(0, n_split):
        total += tl.load(
            P + k * stride_ps + rows64[:, None] * stride_pm + r_idx[None, :], mask=row_mask[:, None], other=0.0
        )
    return total


@triton.autotune(configs=EXPAND_CONFIGS, key=["R_PAD", "ADD", "stride_wn"], restore_value=["Y"])
@triton.jit(do_not_specialize=["T", "S", "R", "n_hsplit", "span_n"])
def expand_kernel(
    HP,
    W2,
    Y,
    offs,  # fp32 [KSPLIT, T, R_PAD], [S, N, R] (any strides), [T, N] (any strides), int64 [S+1]
    T,
    S,
    N,
    R,
    n_hsplit,
    span_n,
    scale,
    stride_hs,
    stride_hm,
    stride_ws,
    stride_wn,
    stride_wr,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    R_PAD: tl.constexpr,
    ADD: tl.constexpr,
    IN_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(1)
    m0, m_end, rows, rows64 = _row_tile(T, BLOCK_M)
    r_idx = tl.arange(0, R_PAD)
    r_mask = r_idx < R
    # Round the intermediate to the input dtype before the second dot, as the unfused reference (two matmuls in
    # that dtype) does; the dot itself still accumulates in fp32.
    h = _sum_partials(HP, n_hsplit, stride_hs, rows64, rows < T, stride_hm, R_PAD, BLOCK_M)
    hc = h.to(W2.dtype.element_ty)
    n_lo = pid_n * span_n
    n_hi = tl.minimum(n_lo + span_n, N)

    seg = _segment_of(offs, S, m0)
    seg_lo = tl.load(offs + seg)
    while seg_lo < m_end:
        seg_hi = tl.load(offs + seg + 1)
        if seg_hi > seg_lo:
            row_mask = (rows >= seg_lo) & (rows < seg_hi)  # this segment's rows of the tile: the only ones stored
            w_base = W2 + seg.to(tl.int64) * stride_ws + r_idx[:, None] * stride_wr
            for n0 in range(n_lo, n_hi, BLOCK_N):
                ns = n0 + tl.arange(0, BLOCK_N)
                n_mask = ns < n_hi
                w = tl.load(w_base + ns[None, :] * stride_wn, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
                y = tl.dot(hc, w, input_precision=IN_PREC) * scale  # [BLOCK_M, BLOCK_N]
                ptrs = Y + rows64[:, None] * stride_ym + ns[None, :] * stride_yn
                mask = row_mask[:, None] & n_mask[None, :]
                if ADD:  # one rounding of (base + delta), in fp32
                    y += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                tl.store(ptrs, y.to(Y.dtype.element_ty), mask=mask)
        seg += 1
        seg_lo = seg_hi


@triton.autotune(configs=SEG_REDUCE_CONFIGS, key=["R_PAD", "stride_od"])
@triton.jit(do_not_specialize=["R", "n_usplit", "n_split"])
def seg_reduce_kernel(
    UP,
    V,
    OUT,
    offs,  # fp32 [USPLIT, T, R_PAD], [T, D], [n_split, S, R, D] (any strides), int64 [S+1]
    D,
    R,
    n_usplit,
    n_split,
    scale,
    stride_us,
    stride_um,
    stride_vm,
    stride_vd,
    stride_oc,
    stride_os,
    stride_or,
    stride_od,
    R_PAD: tl.constexpr,
    IN_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    seg = (pid // n_split).to(tl.int64)
    chunk_id = pid % n_split
    pid_d = tl.program_id(1)
    start = tl.load(offs + seg)
    end = tl.load(offs + seg + 1)
    # Chunk c of the segment's tokens (whole BLOCK_M tiles); with n_split > 1 the launcher sums the chunks' partial
    # results in a fixed order afterwards, so splitting keeps the result deterministic.
    chunk = tl.cdiv(tl.cdiv(end - start, n_split), BLOCK_M) * BLOCK_M
    lo = start + chunk_id * chunk
    hi = tl.minimum(lo + chunk, end)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = ds < D
    r_idx = tl.arange(0, R_PAD)

    # acc^T = V^T U: the wide operand (D) is the dot's M side, so the tile suits wgmma's M >= 64.
    acc = tl.zeros((BLOCK_D, R_PAD), dtype=tl.float32)
    # Sequential walk over the chunk's tokens: the reduction order is fixed, so results are bitwise reproducible
    # (no atomics). Empty segments and chunks skip the loop and store zeros.
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < hi
        u = _sum_partials(UP, n_usplit, stride_us, rows, row_mask, stride_um, R_PAD, BLOCK_M)  # [BM, R_PAD]
        vt = tl.load(
            V + rows[None, :] * stride_vm + ds[:, None] * stride_vd, mask=d_mask[:, None] & row_mask[None, :], other=0.0
        )  # [BLOCK_D, BM]
        acc = tl.dot(vt, u.to(V.dtype.element_ty), acc, input_precision=IN_PREC)

    out = (acc * scale).to(OUT.dtype.element_ty)
    out_base = OUT + chunk_id.to(tl.int64) * stride_oc + seg * stride_os
    tl.store(
        out_base + r_idx[None, :] * stride_or + ds[:, None] * stride_od,
        out,
        mask=d_mask[:, None] & (r_idx[None, :] < R),
    )


@triton.jit(do_not_specialize=["n_split", "numel", "R"])
def sum_splits_kernel(
    P,
    OUT,  # fp32 [n_split, S, R, D] contiguous, [S, R, D] (any strides)
    n_split,
    numel,
    R,
    D,
    stride_os,
    stride_or,
    stride_od,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = P + i
    for _ in range(0, n_split):  # fixed order: same bits every run
        total += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += numel  # 64-bit pointer steps: no int32 product c * numel
    s = i // (R * D)
    rd = i % (R * D)
    tl.store(
        OUT + s * stride_os + (rd // D) * stride_or + (rd % D) * stride_od, total.to(OUT.dtype.element_ty), mask=mask
    )
