"""Triton kernels behind :func:`tagi_kernels.triton_lora_delta` (shapes and the backward derivation live there).

Two kernels serve the forward and the backward pass:

``fused_lora_kernel``  per token block of one segment ``s`` (rows ``m``) and one span of output columns ``n``:
    ``H[m, :] = X[m, :] @ W1[s]^T``        (shrink, ``W1 [S, R, K]``; the ``[BLOCK_M, R_PAD]`` tile stays on chip)
    ``Y[m, n] = scale * H[m, :] @ W2[s, n, :]^T``   (expand, ``W2 [S, N, R]``)
    and, when asked, writes ``H`` (fp32) for the weight gradients. Forward: ``(X, W1, W2) = (x, A, B)``.
    Backward: ``(dY, B^T, A^T)`` gives ``dX`` and ``G = dY B`` -- the transposes are stride views, not copies.
``seg_outer_kernel``   per segment ``s``, chunk ``c`` of its tokens and one block of columns ``d``:
    ``OUT[c, s, :, d] = scale * sum_{t in chunk c of s} U[t, :]^T V[t, d]``  (``U`` fp32 ``[T, R_PAD]``, ``V [T, D]``)
    one program owns one output tile and walks its tokens in order: deterministic, no atomics. With one chunk
    (many tasks) it writes the gradient directly; with few tasks the tokens are split into chunks for
    parallelism and the launcher sums the fp32 partials in a fixed order.
    ``dA = (U=G, V=x)``, ``dB^T = (U=H, V=dY)`` (written through the strides of ``dB``).

Token blocks never straddle two segments: the launcher passes a block -> (segment, first row) table built with
torch ops (see ``lora_delta.block_table``), sized by an upper bound so that building it needs no host sync;
the unused tail entries carry segment ``-1`` and their programs return at once.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton picks interpreter mode from this variable when a kernel is decorated; mirror it so that interpreter
# runs (CPU tests) use one small config instead of benchmarking a GPU search space they cannot use.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Smallest tile edge handed to tl.dot (tensor cores need M, N, K >= 16).
MIN_DOT = 16


def _fused_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_K": 16, "BLOCK_N": 16, "SPAN_N": 32}, num_warps=1, num_stages=1)]
    # SPAN_N trades parallelism (more column spans -> more programs) against recomputing the shrink:
    # every span of a token block recomputes X @ W1^T, so wide spans pay off when d_out is large.
    space = [
        (32, 64, 256, 4, 4),
        (64, 64, 512, 4, 3),
        (64, 128, 1024, 4, 3),
        (64, 128, 2048, 8, 3),
        (128, 64, 512, 4, 3),
        (128, 128, 1024, 8, 3),
        (64, 128, 4096, 8, 4),
        (128, 128, 8192, 8, 3),
    ]
    return [triton.Config({"BLOCK_K": bk, "BLOCK_N": bn, "SPAN_N": span}, num_warps=w, num_stages=st)
            for bk, bn, span, w, st in space]


def _seg_outer_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_D": 16}, num_warps=1, num_stages=1)]
    space = [
        (32, 32, 4, 4),
        (64, 32, 4, 4),
        (64, 64, 4, 3),
        (128, 64, 4, 3),
        (64, 128, 4, 3),
        (128, 128, 8, 3),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_D": bd}, num_warps=w, num_stages=st) for bm, bd, w, st in space]


@triton.autotune(configs=_fused_configs(), key=["K", "N", "R_PAD", "BLOCK_M", "WRITE_Y", "STORE_H", "stride_w1k"])
@triton.jit
def fused_lora_kernel(
    X, W1, W2, Y, H,  # [T, K], [S, R, K], [S, N, R], [T, N], fp32 [T, R_PAD]
    blk_seg, blk_row, offs,  # int32 [NB], int32 [NB], int64 [S+1]
    K, N, R, scale,
    stride_xm, stride_xk,
    stride_w1s, stride_w1r, stride_w1k,
    stride_w2s, stride_w2n, stride_w2r,
    stride_ym, stride_yn,
    stride_hm,
    BLOCK_M: tl.constexpr, R_PAD: tl.constexpr, WRITE_Y: tl.constexpr, STORE_H: tl.constexpr,
    IN_PREC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SPAN_N: tl.constexpr,
):
    pid = tl.program_id(0)
    if WRITE_Y:
        # Spans of one token block are adjacent in launch order so its X rows are re-read from L2.
        n_spans = tl.cdiv(N, SPAN_N)
        blk = pid // n_spans
        span = pid % n_spans
    else:
        blk = pid
        span = 0
    seg = tl.load(blk_seg + blk)
    if seg < 0:
        return
    seg64 = seg.to(tl.int64)
    row0 = tl.load(blk_row + blk)
    seg_end = tl.load(offs + seg64 + 1)
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < seg_end
    r_idx = tl.arange(0, R_PAD)
    r_mask = r_idx < R  # rank padded to R_PAD >= 16 with zeros: padded columns of H stay exactly 0

    h = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    w1_base = W1 + seg64 * stride_w1s + r_idx[None, :] * stride_w1r
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w1 = tl.load(w1_base + ks[:, None] * stride_w1k, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        h = tl.dot(x, w1, h, input_precision=IN_PREC)  # [BLOCK_M, R_PAD], fp32 accumulation

    if STORE_H:
        if span == 0:
            tl.store(H + rows[:, None] * stride_hm + r_idx[None, :], h, mask=row_mask[:, None])

    if WRITE_Y:
        # Round the intermediate to the input dtype before the second dot, as the unfused reference (two bmm in
        # that dtype) does; the dot itself still accumulates in fp32.
        hc = h.to(W2.dtype.element_ty)
        w2_base = W2 + seg64 * stride_w2s + r_idx[:, None] * stride_w2r
        n_lo = span * SPAN_N
        n_hi = tl.minimum(n_lo + SPAN_N, N)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            n_mask = ns < n_hi
            w2 = tl.load(w2_base + ns[None, :] * stride_w2n, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            y = tl.dot(hc, w2, input_precision=IN_PREC) * scale  # [BLOCK_M, BLOCK_N]
            tl.store(Y + rows[:, None] * stride_ym + ns[None, :] * stride_yn, y.to(Y.dtype.element_ty),
                     mask=row_mask[:, None] & n_mask[None, :])


@triton.autotune(configs=_seg_outer_configs(), key=["D", "R_PAD", "n_split"])
@triton.jit
def seg_outer_kernel(
    U, V, OUT, offs,  # fp32 [T, R_PAD], [T, D], [n_split, S, R, D] (any strides), int64 [S+1]
    D, R, n_split, scale,
    stride_um, stride_vm, stride_vd,
    stride_oc, stride_os, stride_or, stride_od,
    R_PAD: tl.constexpr, IN_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
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

    acc = tl.zeros((R_PAD, BLOCK_D), dtype=tl.float32)
    # Sequential walk over the chunk's tokens: the reduction order is fixed, so results are bitwise reproducible
    # (no atomics). Empty segments and chunks skip the loop and store zeros.
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < hi
        u = tl.load(U + rows[None, :] * stride_um + r_idx[:, None], mask=row_mask[None, :], other=0.0)  # [R_PAD, BM]
        v = tl.load(V + rows[:, None] * stride_vm + ds[None, :] * stride_vd,
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)  # [BM, BLOCK_D]
        acc = tl.dot(u.to(v.dtype), v, acc, input_precision=IN_PREC)

    out = (acc * scale).to(OUT.dtype.element_ty)
    tl.store(OUT + chunk_id * stride_oc + seg * stride_os + r_idx[:, None] * stride_or + ds[None, :] * stride_od, out,
             mask=(r_idx[:, None] < R) & d_mask[None, :])
