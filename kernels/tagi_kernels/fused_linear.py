r"""The adapted linear as one Triton GEMM per direction, the per-task LoRA inside it (issue 26).

Forward, rows ``m`` of task segment ``s(m)``::

    Y[m, :] = X[m, :] W^T (+ bias) + round(scale * X[m, :] A_s^T) B_s^T          written once

Backward (the base ``W`` is frozen: no dW unless it asks for one)::

    dX[m, :] = dY[m, :] W + round(scale * dY[m, :] B_s) A_s                      the dgrad GEMM, written once
    dA_s = scale * G_s^T X_s,  dB_s = scale * dY_s^T H_s                           segment-grouped reductions (v1)

Both directions are one kernel, ``fused_linear_kernel``: ``Y = X Wop^T + scale * (X L1_s^T) L2_s^T`` with
``Wop [N, K]``, ``L1 [S, R, K]``, ``L2 [S, N, R]`` given by strides (forward: ``W, A, B``; backward: the views
``W^T, B^T, A^T``, no copies). One program owns one ``[BLOCK_M, BLOCK_N]`` output tile (grouped ordering over
``GROUP_M`` row tiles so neighbouring programs share x rows and W columns in L2).

The r-wide intermediate ``H = X L1_s^T`` comes one of two ways (``FUSE_SHRINK``, picked by :func:`choose_shrink`):

* fused: the main loop multiplies the x tile it already loaded for the GEMM by ``L1`` of the segment of the tile's
  first row, one extra ``[BLOCK_M, BLOCK_K] x [BLOCK_K, R_PAD]`` dot per K step (no nested loop in the main loop,
  so the pipeliner treats it as a plain GEMM loop). A tile whose rows span several segments (a segment boundary,
  or short segments inside it) then fixes its H exactly after the main loop: rows of the first segment keep their
  value, every other segment present recomputes its rows' H with its own ``L1`` (x rows re-read, from L2 mostly).
  Costs ``R_PAD / BLOCK_N`` of the GEMM's FLOPs (each N tile recomputes its rows' H) and no extra x pass; the
  programs of the first column tile store H (fp32) for the backward's dB / dA.
* precomputed: v1's ``shrink_kernel`` writes split-K partials of H (one extra pass over x), the GEMM reads and
  sums them in its epilogue. Costs one pass of x instead of FLOPs: better when ``R_PAD * N`` is large.

The epilogue adds ``scale * H_s L2_s^T`` per segment present in the tile (rows masked to their segment, so each row
sees only its segment's factors), then the bias, and rounds ``base + delta`` once into Y. Exactness at segment
boundaries therefore costs one more small dot per extra segment in a tile, in both the fused shrink and the expand.

Shared memory: configs whose estimate exceeds sm_90's 232448 B for the call's dtype are pruned before autotuning
(:func:`smem_estimate`; fp32 tiles are twice the bytes), and the sm_90 AOT compile test prints the compiler's own
figure for every config left.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .launch import _input_precision, pad_rank, seg_reduce
from .launch import shrink as split_shrink
from .lora_delta import _check, _device_of
from .lora_kernels import INTERPRET, SMEM_LIMIT, TUNE, _segment_of, _sum_partials

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). The first config that fits is the fixed one
# (TAGI_KERNELS_TUNE=fixed); the last is small enough for fp32 with a rank of 64.
FUSED_SPACE = [(128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4), (64, 256, 64, 8, 4, 4), (64, 128, 32, 8, 4, 3)]
# Under the interpreter: the GPU's 128 x 128 x 64 tile (so tests cross segment and tile boundaries as a GPU does).
FUSED_INTERP = (128, 128, 64, 8, 1, 1)
NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")


def smem_estimate(
    block_m: int, block_n: int, block_k: int, num_stages: int, elt: int, r_pad: int, fuse_shrink: bool
) -> int:
    """Bytes of shared memory a config is expected to use: ``num_stages`` buffered x, W (and L1) tiles.
    Conservative (the compiler keeps ``num_stages - 1`` in flight); the AOT test prints the real figure."""
    per_stage = (block_m * block_k + block_k * block_n + (block_k * r_pad if fuse_shrink else 0)) * elt
    return num_stages * per_stage


def _fits(c: triton.Config, elt: int, r_pad: int, fuse: bool) -> bool:
    k = c.kwargs
    return smem_estimate(k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], c.num_stages, elt, r_pad, fuse) <= SMEM_LIMIT


def prune_fused(configs, named_args, **kwargs):
    """Drop configs over the shared-memory limit for this call's dtype and rank; fixed tuning keeps the first
    that fits (one compile per specialization)."""
    elt = named_args["X"].element_size()
    r_pad, fuse = kwargs.get("R_PAD", named_args.get("R_PAD")), kwargs.get("FUSE_SHRINK", named_args.get("FUSE_SHRINK"))
    kept = [c for c in configs if _fits(c, elt, r_pad, fuse)] or [configs[-1]]
    return kept[:1] if TUNE == "fixed" else kept


def fused_configs() -> list[triton.Config]:
    space = [FUSED_INTERP] if INTERPRET else FUSED_SPACE
    return [triton.Config(dict(zip(NAMES, c[:4])), num_warps=c[4], num_stages=c[5]) for c in space]


FUSED_CONFIGS = fused_configs()


@triton.autotune(
    configs=FUSED_CONFIGS,
    key=["N", "K", "R_PAD", "FUSE_SHRINK", "HAS_BIAS", "STORE_H"],
    prune_configs_by={"early_config_prune": prune_fused},
)
@triton.jit(do_not_specialize=["T", "S", "R", "n_hsplit"])
def fused_linear_kernel(
    X,
    W,
    BIAS,
    L1,
    L2,
    HP,
    HOUT,
    Y,
    offs,  # [T,K], [N,K], [N], [S,R,K], [S,N,R], fp32 [*,T,R_PAD] x2, [T,N], i64
    T,
    S,
    N,
    K,
    R,
    n_hsplit,
    scale,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_1s,
    stride_1r,
    stride_1k,
    stride_2s,
    stride_2n,
    stride_2r,
    stride_hs,
    stride_hm,
    stride_ym,
    stride_yn,
    R_PAD: tl.constexpr,
    FUSE_SHRINK: tl.constexpr,
    STORE_H: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IN_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles sweep the columns together (x rows and W columns stay in L2).
    pid = tl.program_id(0)
    num_m = tl.cdiv(T, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    row_in = rows < T
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_in = cols < N
    r_idx = tl.arange(0, R_PAD)
    r_mask = r_idx < R  # rank zero-padded to R_PAD: padded columns of H stay exactly 0
    seg_first = _segment_of(offs, S, m0)
    seg_last = _segment_of(offs, S, tl.minimum(m0 + BLOCK_M, T) - 1)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FUSE_SHRINK:
        h = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        l1_first = L1 + seg_first.to(tl.int64) * stride_1s + r_idx[None, :] * stride_1r
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_in = ks < K
        x = tl.load(
            X + rows64[:, None] * stride_xm + ks[None, :] * stride_xk, mask=row_in[:, None] & k_in[None, :], other=0.0
        )
        w = tl.load(
            W + cols[None, :] * stride_wn + ks[:, None] * stride_wk, mask=k_in[:, None] & col_in[None, :], other=0.0
        )  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(x, w, acc, input_precision=IN_PREC)
        if FUSE_SHRINK:  # the shrink on the x tile already loaded, with the first row's segment factors
            a = tl.load(l1_first + ks[:, None] * stride_1k, mask=k_in[:, None] & r_mask[None, :], other=0.0)
            h = tl.dot(x, a, h, input_precision=IN_PREC)

    if FUSE_SHRINK:
        if seg_last > seg_first:
            # Rows past the first segment used the wrong factors above: keep the first segment's rows and recompute
            # the others' H with their own L1 (each row belongs to one segment, so the masked sums are exact).
            first_hi = tl.load(offs + seg_first + 1)
            h = tl.where((rows < first_hi)[:, None], h, 0.0)
            s = seg_first + 1  # a tensor, so one loop form serves the compiler and the interpreter
            while s <= seg_last:
                lo = tl.load(offs + s)
                hi = tl.load(offs + s + 1)
                if hi > lo:
                    seg_rows = (rows >= lo) & (rows < hi)
                    l1_s = L1 + s.to(tl.int64) * stride_1s + r_idx[None, :] * stride_1r
                    for k0 in range(0, K, BLOCK_K):
                        ks = k0 + tl.arange(0, BLOCK_K)
                        k_in = ks < K
                        xs = tl.load(
                            X + rows64[:, None] * stride_xm + ks[None, :] * stride_xk,
                            mask=seg_rows[:, None] & k_in[None, :],
                            other=0.0,
                        )
                        a = tl.load(l1_s + ks[:, None] * stride_1k, mask=k_in[:, None] & r_mask[None, :], other=0.0)
                        h = tl.dot(xs, a, h, input_precision=IN_PREC)
                s += 1
        if STORE_H:  # one column tile stores H for the backward (dB needs H, dA needs G)
            if pid_n == 0:
                tl.store(HOUT + rows64[:, None] * R_PAD + r_idx[None, :], h, mask=row_in[:, None])
    else:
        h = _sum_partials(HP, n_hsplit, stride_hs, rows64, row_in, stride_hm, R_PAD, BLOCK_M)

    # Epilogue: the expand per segment present in the tile, rows masked to their segment, accumulated straight
    # into the GEMM's accumulator (a second [BLOCK_M, BLOCK_N] fp32 accumulator would double the registers the
    # tile holds). So the scale goes into H before it is rounded to the input dtype for the second dot (the
    # reference rounds H, then scales): one rounding of the same size, exact when the scale is a power of two.
    hc = (h * scale).to(L2.dtype.element_ty)
    s = seg_first
    while s <= seg_last:
        lo = tl.load(offs + s)
        hi = tl.load(offs + s + 1)
        if hi > lo:
            seg_rows = (rows >= lo) & (rows < hi)
            hs = tl.where(seg_rows[:, None], hc, tl.zeros_like(hc))
            b = tl.load(
                L2 + s.to(tl.int64) * stride_2s + cols[None, :] * stride_2n + r_idx[:, None] * stride_2r,
                mask=r_mask[:, None] & col_in[None, :],
                other=0.0,
            )  # [R_PAD, BLOCK_N]
            acc = tl.dot(hs, b, acc, input_precision=IN_PREC)
        s += 1
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    tl.store(
        Y + rows64[:, None] * stride_ym + cols[None, :] * stride_yn,
        acc.to(Y.dtype.element_ty),
        mask=row_in[:, None] & col_in[None, :],
    )


# H100 ~800 TFLOP/s bf16 over ~3.0 TB/s copy: one byte of a pass costs as much time as ~267 FLOPs.
FLOPS_PER_BYTE = 800e12 / 3.0e12
TYPICAL_BLOCK_N = 256


def choose_shrink(r_pad: int, n: int, elt: int) -> bool:
    """True: fuse the shrink into the GEMM's main loop. A model, not a measurement (kernels/NOTES.md): fused costs
    ``R_PAD / BLOCK_N`` of the GEMM's ``2 T K N`` FLOPs; precomputed costs one read of x (``T K elt`` bytes) plus
    its small fp32 partials. Fused wins when ``R_PAD * N / BLOCK_N < elt * FLOPS_PER_BYTE / 2``."""
    return r_pad * n / TYPICAL_BLOCK_N < elt * FLOPS_PER_BYTE / 2


def fused_linear(
    x: torch.Tensor,
    wop: torch.Tensor,
    bias: torch.Tensor | None,
    l1: torch.Tensor,
    l2: torch.Tensor,
    offs: torch.Tensor,
    scale: float,
    y: torch.Tensor,
    fuse_shrink: bool,
    store_h: bool,
    hp: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``y = x wop^T (+ bias) + scale * (x l1_s^T) l2_s^T``; returns fp32 H ``[1, T, R_PAD]`` when ``store_h`` (fused
    shrink only). ``hp``: precomputed split-K partials of H (``fuse_shrink=False``). Any strides for every tensor."""
    T, K = x.shape
    N = wop.shape[0]
    S, R, _ = l1.shape
    r_pad = pad_rank(R)
    hout = torch.empty(1, T, r_pad, device=x.device, dtype=torch.float32) if store_h else None
    hp_arg = hp if hp is not None else x  # unused pointer when the shrink is fused (constexpr-guarded)
    hp_s = (hp.stride(0), hp.stride(1)) if hp is not None else (0, 0)

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    fused_linear_kernel[grid](
        x,
        wop,
        bias if bias is not None else x,
        l1,
        l2,
        hp_arg,
        hout if hout is not None else x,
        y,
        offs,
        T,
        S,
        N,
        K,
        R,
        hp.shape[0] if hp is not None else 0,
        float(scale),
        x.stride(0),
        x.stride(1),
        wop.stride(0),
        wop.stride(1),
        l1.stride(0),
        l1.stride(1),
        l1.stride(2),
        l2.stride(0),
        l2.stride(1),
        l2.stride(2),
        *hp_s,
        y.stride(0),
        y.stride(1),
        R_PAD=r_pad,
        FUSE_SHRINK=fuse_shrink,
        STORE_H=store_h and fuse_shrink,
        HAS_BIAS=bias is not None,
        IN_PREC=_input_precision(x.dtype),
    )
    return hout


class LoraLinearFusedFunction(torch.autograd.Function):
    """The adapted linear, fused: forward one GEMM (+ v1's shrink when not fused); backward one dgrad GEMM (+ the
    shrink of dY when not fused), dA / dB by v1's segment-grouped reduction; dW and dbias by torch only when asked
    (TAGI's base is frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, seg_offsets, scale, shrink):
        x, A, B = x.contiguous(), A.contiguous(), B.contiguous()
        offs = seg_offsets.to(device=x.device, dtype=torch.int64).contiguous()
        T, d_in = x.shape
        d_out = weight.shape[0]
        r_pad = pad_rank(A.shape[1])
        ctx.scale, ctx.has_bias = float(scale), bias is not None
        ctx.empty = T == 0 or A.shape[1] == 0 or d_in == 0 or d_out == 0 or A.shape[0] == 0
        if ctx.empty:  # no LoRA work: the base alone (and zero LoRA gradients)
            ctx.save_for_backward(x, weight, A, B)
            return torch.nn.functional.linear(x, weight, bias)
        fuse = choose_shrink(r_pad, d_out, x.element_size()) if shrink == "auto" else shrink == "fused"
        ctx.fuse_bwd = choose_shrink(r_pad, d_in, x.element_size()) if shrink == "auto" else shrink == "fused"
        y = torch.empty(T, d_out, device=x.device, dtype=x.dtype)
        need_b = ctx.needs_input_grad[4]
        with _device_of(x):
            hp = None if fuse else split_shrink(x, A, offs)
            h = fused_linear(x, weight, bias, A, B, offs, ctx.scale, y, fuse, store_h=fuse and need_b, hp=hp)
        ctx.save_for_backward(x, weight, A, B, offs, (h if fuse else hp) if need_b else None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dy = dy.contiguous()
        if ctx.empty:
            x, weight, A, B = ctx.saved_tensors
            return (
                dy @ weight if need_x else None,
                dy.t() @ x if need_w else None,
                dy.sum(0) if need_bias and ctx.has_bias else None,
                torch.zeros_like(A) if need_a else None,
                torch.zeros_like(B) if need_b else None,
                None,
                None,
                None,
            )
        x, weight, A, B, offs, hp = ctx.saved_tensors
        dx = dA = dB = None
        bt, at = B.transpose(1, 2), A.transpose(1, 2)  # [S, r, d_out], [S, d_in, r]: stride views, no copies
        with _device_of(x):
            gp = None
            if need_x:
                # dX = dY W + scale * (dY B_s) A_s: the dgrad GEMM on W^T's view, G from the dY tiles it loads.
                dx = torch.empty_like(x)
                if not ctx.fuse_bwd:
                    gp = split_shrink(dy, bt, offs)
                g = fused_linear(
                    dy,
                    weight.t(),
                    None,
                    bt,
                    at,
                    offs,
                    ctx.scale,
                    dx,
                    ctx.fuse_bwd,
                    store_h=ctx.fuse_bwd and need_a,
                    hp=gp,
                )
                gp = g if ctx.fuse_bwd else gp
            if need_a:
                if gp is None:
                    gp = split_shrink(dy, bt, offs)
                dA = seg_reduce(gp, x, torch.empty_like(A), offs, ctx.scale)
            if need_b:
                dB = torch.empty_like(B)
                seg_reduce(hp, dy, dB.transpose(1, 2), offs, ctx.scale)  # dB^T = scale * H^T dY, via strides
        dw = dy.t() @ x if need_w else None
        dbias = dy.sum(0) if need_bias and ctx.has_bias else None
        return dx, dw, dbias, dA, dB, None, None, None


SHRINK_CHOICES = ("auto", "fused", "split")


def triton_lora_linear_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    seg_offsets: torch.Tensor,
    scale: float = 1.0,
    shrink: str = "auto",
    checked: bool = False,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + scale * (x A_s^T) B_s^T`` ``[T, d_out]`` as one fused GEMM per direction;
    differentiable in every tensor. ``shrink``: ``fused`` (H from the GEMM's x tiles), ``split`` (v1's split-K
    shrink kernel first), ``auto`` (:func:`choose_shrink`, per direction)."""
    _check("triton_lora_linear_fused", x, A, B, seg_offsets, checked)
    if shrink not in SHRINK_CHOICES:
        raise ValueError(f"triton_lora_linear_fused: shrink must be one of {', '.join(SHRINK_CHOICES)}, got {shrink!r}")
    if weight.dim() != 2 or weight.shape != (B.shape[1], x.shape[1]) or weight.dtype != x.dtype:
        raise ValueError(
            f"triton_lora_linear_fused: weight must be [d_out={B.shape[1]}, d_in={x.shape[1]}] "
            f"{x.dtype}, got {tuple(weight.shape)} {weight.dtype}"
        )
    if bias is not None and (bias.shape != (B.shape[1],) or bias.dtype != x.dtype):
        raise ValueError(
            f"triton_lora_linear_fused: bias must be [d_out={B.shape[1]}] {x.dtype}, got "
            f"{tuple(bias.shape)} {bias.dtype}"
        )
    return LoraLinearFusedFunction.apply(x, weight, bias, A, B, seg_offsets, float(scale), shrink)
