r"""Fused per-task LoRA delta: launchers and the autograd Function for ``tagi_ds.ops.lora_delta(impl="triton")``.

Shapes. ``x [T, d_in]`` holds tokens grouped by task; ``seg_offsets`` int64 ``[S+1]`` (non-decreasing,
``[0] = 0``, ``[S] = T``; segment ``s`` is rows ``seg_offsets[s]:seg_offsets[s+1]``, possibly empty);
``A [S, r, d_in]``, ``B [S, d_out, r]``, a Python scalar ``scale``. Result ``Y [T, d_out]``.

Forward, for the rows ``X_s [L_s, d_in]`` of segment ``s``::

    H_s = X_s A_s^T              [L_s, r]      (shrink; kept on chip, written out only for dB)
    Y_s = scale * H_s B_s^T      [L_s, d_out]  (expand)

Backward. Write ``dZ`` for the gradient dL/dZ and ``δZ`` for a perturbation, ``<P, Q> = tr(P^T Q)``. Then
``δY_s = scale * (δX_s A_s^T B_s^T + X_s δA_s^T B_s^T + H_s δB_s^T)`` and ``δL = <dY_s, δY_s>``; moving each
factor across the inner product (cyclic trace) reads off the gradients::

    <dY, δX A^T B^T> = <dY B A, δX>                                  =>  dX_s = scale * G_s A_s    [L_s, d_in]
    <dY, X δA^T B^T> = tr(dY^T X δA^T B^T) = tr(B^T dY^T X δA^T)
                     = <(dY B)^T X, δA>                               =>  dA_s = scale * G_s^T X_s  [r, d_in]
    <dY, H δB^T>     = tr(dY^T H δB^T) = <dY^T H, δB>                 =>  dB_s = scale * dY_s^T H_s [d_out, r]

    with G_s = dY_s B_s [L_s, r], the shrink of the output gradient.

``dX`` has the forward's structure with ``(X, A, B) -> (dY, B^T, A^T)``, so the same fused kernel computes it
(the transposes are stride views) and writes ``G`` on the side. ``dA`` and ``dB`` are per-segment sums over tokens:
one program owns one ``[r, block]`` tile of one segment and walks that segment's tokens in order, so the
reduction is deterministic (no float atomics). With few tasks the tokens of a segment are also split into chunks
whose fp32 partial tiles are summed afterwards in a fixed order (still deterministic). Launches, whatever S is:
1 forward; 3 backward (fused dX+G, dA, dB), plus one partial-sum reduction per weight gradient when split.

Numerics: accumulation is fp32; the r-wide intermediates are rounded to the input dtype before their second
matmul, like the unfused bf16/fp16 reference. fp32 inputs use IEEE dots unless
``torch.backends.cuda.matmul.allow_tf32`` is set (then TF32, as torch does). Ranks are zero-padded to a power of
two >= 16 inside the kernel (tl.dot needs K >= 16); the padding never reaches the outputs.

The Function is a pure function of its inputs (no state kept between calls besides Triton's autotune cache), so
it recomputes correctly under ``torch.utils.checkpoint(use_reentrant=False)``. Inputs are made contiguous.
"""

from __future__ import annotations

import contextlib

import torch
import triton
from torch.autograd.function import once_differentiable

from .lora_kernels import INTERPRET, MIN_DOT, fused_lora_kernel, seg_outer_kernel

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def pad_rank(r: int) -> int:
    """Rank as seen by the kernels: a power of two (tl.arange) and at least the minimum dot size."""
    return max(MIN_DOT, triton.next_power_of_2(max(r, 1)))


def pick_block_m(T: int, S: int) -> int:
    """Token tile of the fused kernel. Fixed before launch (the block table depends on it), so not autotuned:
    short segments waste up to BLOCK_M - 1 padded rows each, long ones want big tiles."""
    if INTERPRET:
        return MIN_DOT
    mean_len = T // max(S, 1)
    return max(MIN_DOT, min(64, triton.next_power_of_2(max(mean_len, 1))))


def block_table(seg_offsets: torch.Tensor, T: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Map token blocks to segments: ``(blk_seg, blk_row)``, int32 ``[NB]`` each, NB = ceil(T / block_m) + S.

    Block ``b`` covers rows ``blk_row[b] : min(blk_row[b] + block_m, seg_offsets[blk_seg[b] + 1])`` of segment
    ``blk_seg[b]``. NB bounds sum_s ceil(L_s / block_m) from above, so the table is built with torch ops only
    (no host sync); entries past the real count have ``blk_seg = -1`` and their programs exit at once.
    """
    S = seg_offsets.numel() - 1
    nb = triton.cdiv(T, block_m) + S
    lengths = seg_offsets[1:] - seg_offsets[:-1]  # [S]
    blocks = (lengths + block_m - 1) // block_m  # [S] blocks per segment (0 for empty segments)
    ends = torch.cumsum(blocks, 0)  # [S] one past each segment's last block
    b = torch.arange(nb, device=seg_offsets.device)
    # The segment of block b is the first s with ends[s] > b; empty segments own no block and are skipped.
    seg = torch.searchsorted(ends, b, right=True).clamp_(max=max(S - 1, 0))
    row = seg_offsets[seg] + (b - (ends[seg] - blocks[seg])) * block_m
    valid = b < ends[-1]
    blk_seg = torch.where(valid, seg, -1).to(torch.int32)
    blk_row = torch.where(valid, row, 0).to(torch.int32)
    return blk_seg, blk_row


def _device_of(t: torch.Tensor):
    # Triton launches on the current CUDA device; make it the tensors' one (a rank may hold several devices).
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _input_precision(dtype: torch.dtype) -> str:
    # Only fp32 x fp32 dots have a choice; follow torch's own matmul setting so that impl="triton" and
    # impl="torch" agree on whether fp32 means IEEE or TF32.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def fused_lora(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, offs: torch.Tensor, table, block_m: int,
               scale: float, write_y: bool, store_h: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``Y = scale * (x W1_s^T) W2_s^T`` per segment and/or ``H = x W1_s^T`` (fp32 ``[T, R_PAD]``), one launch.

    x ``[T, K]``, w1 ``[S, R, K]``, w2 ``[S, N, R]`` (any strides).
    """
    T, K = x.shape
    S, R, _ = w1.shape
    N = w2.shape[1]
    r_pad = pad_rank(R)
    blk_seg, blk_row = table
    y = torch.empty(T, N, device=x.device, dtype=x.dtype) if write_y else x.new_empty(0)
    h = torch.empty(T, r_pad, device=x.device, dtype=torch.float32) if store_h else x.new_empty(0, dtype=torch.float32)
    nb = blk_seg.numel()

    def grid(meta):
        return (nb * triton.cdiv(N, meta["SPAN_N"]),) if write_y else (nb,)

    fused_lora_kernel[grid](
        x, w1, w2, y, h, blk_seg, blk_row, offs,
        K, N, R, float(scale),
        x.stride(0), x.stride(1),
        w1.stride(0), w1.stride(1), w1.stride(2),
        w2.stride(0), w2.stride(1), w2.stride(2),
        y.stride(0) if write_y else 0, y.stride(1) if write_y else 0,
        r_pad,
        BLOCK_M=block_m, R_PAD=r_pad, WRITE_Y=write_y, STORE_H=store_h, IN_PREC=_input_precision(x.dtype),
    )
    return (y if write_y else None), (h if store_h else None)


def pick_token_splits(T: int, S: int, D: int, device: torch.device) -> int:
    """Chunks per segment for the weight-gradient reduction. One program per (segment, column block) leaves most
    SMs idle when there are few tasks (S=1, d=2048: 32 programs); split each segment's tokens so the grid covers
    about two waves, keeping >= ~256 tokens per chunk so the partial sums stay cheap."""
    if INTERPRET:
        return 2 if T >= 32 * S else 1  # exercise both paths at test sizes
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, S * triton.cdiv(D, 64))
    return max(1, min(want, T // (256 * S), 16))


def seg_outer(u: torch.Tensor, v: torch.Tensor, out: torch.Tensor, offs: torch.Tensor, scale: float,
              splits: int = 1) -> torch.Tensor:
    """``out[s] = scale * U_s^T V_s`` per segment. u fp32 ``[T, R_PAD]``, v ``[T, D]``, out ``[S, R, D]`` (any
    strides, e.g. a transposed view of dB). One launch, plus a fixed-order sum of fp32 partials when splits > 1."""
    S, R, D = out.shape
    r_pad = u.shape[1]
    target = out if splits == 1 else torch.empty(splits, S, R, D, device=out.device, dtype=torch.float32)
    stride_oc = 0 if splits == 1 else target.stride(0)
    t_s, t_r, t_d = target.stride()[-3:]

    def grid(meta):
        return (S * splits, triton.cdiv(D, meta["BLOCK_D"]))

    seg_outer_kernel[grid](
        u, v, target, offs,
        D, R, splits, float(scale),
        u.stride(0), v.stride(0), v.stride(1),
        stride_oc, t_s, t_r, t_d,
        R_PAD=r_pad, IN_PREC=_input_precision(v.dtype),
    )
    if splits > 1:
        out.copy_(target.sum(0))  # torch reductions are atomics-free: same order, same bits, every run
    return out


class LoraDeltaFunction(torch.autograd.Function):
    """Autograd wrapper: forward = 1 fused launch; backward = dX+G, dA, dB launches, each skipped when unneeded."""

    @staticmethod
    def forward(ctx, x, A, B, seg_offsets, scale):
        x, A, B = x.contiguous(), A.contiguous(), B.contiguous()
        offs = seg_offsets.to(device=x.device, dtype=torch.int64).contiguous()
        T, S, r, d_out = x.shape[0], A.shape[0], A.shape[1], B.shape[1]
        ctx.scale = float(scale)
        ctx.empty = T == 0 or r == 0 or d_out == 0 or x.shape[1] == 0
        if ctx.empty:  # nothing to launch: the delta and every gradient are zero
            ctx.save_for_backward(x, A, B)
            return x.new_zeros(T, d_out)
        ctx.block_m = pick_block_m(T, S)
        with _device_of(x):
            table = block_table(offs, T, ctx.block_m)
            y, h = fused_lora(x, A, B, offs, table, ctx.block_m, ctx.scale, write_y=True,
                              store_h=ctx.needs_input_grad[2])
        ctx.save_for_backward(x, A, B, offs, *table, h)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        if ctx.empty:
            x, A, B = ctx.saved_tensors
            return (torch.zeros_like(x) if need_x else None, torch.zeros_like(A) if need_a else None,
                    torch.zeros_like(B) if need_b else None, None, None)
        x, A, B, offs, blk_seg, blk_row, h = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dA = dB = None
        with _device_of(x):
            if need_x or need_a:
                # dX = s * (dY B) A is the forward with (x, A, B) -> (dY, B^T, A^T); G = dY B comes out on the side.
                dx, g = fused_lora(dy, B.transpose(1, 2), A.transpose(1, 2), offs, (blk_seg, blk_row), ctx.block_m,
                                   ctx.scale, write_y=need_x, store_h=need_a)
                if need_a:
                    splits = pick_token_splits(x.shape[0], A.shape[0], A.shape[2], x.device)
                    dA = seg_outer(g, x, torch.empty_like(A), offs, ctx.scale, splits)
            if need_b:
                dB = torch.empty_like(B)
                splits = pick_token_splits(x.shape[0], B.shape[0], B.shape[1], x.device)
                seg_outer(h, dy, dB.transpose(1, 2), offs, ctx.scale, splits)  # dB^T = s * H^T dY, via strides
        return dx, dA, dB, None, None


def triton_lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, seg_offsets: torch.Tensor,
                      scale: float = 1.0) -> torch.Tensor:
    """``[T, d_out]`` per-segment ``scale * (x A_s^T) B_s^T`` with the fused Triton kernel; differentiable in x, A, B.

    Checks shapes, dtypes and devices without a host sync; the contents of ``seg_offsets`` (monotone, ends at 0
    and T) are validated by ``tagi_ds.ops.lora_delta``, the public entry point.
    """
    if x.dim() != 2 or A.dim() != 3 or B.dim() != 3:
        raise ValueError(f"triton_lora_delta: want x [T, d_in], A [S, r, d_in], B [S, d_out, r], got "
                         f"{tuple(x.shape)}, {tuple(A.shape)}, {tuple(B.shape)}")
    S, r, d_in = A.shape
    if x.shape[1] != d_in or B.shape[0] != S or B.shape[2] != r:
        raise ValueError(f"triton_lora_delta: shapes disagree: x {tuple(x.shape)}, A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)}")
    if seg_offsets.dim() != 1 or seg_offsets.numel() != S + 1 or seg_offsets.dtype != torch.int64:
        raise ValueError(f"triton_lora_delta: seg_offsets must be int64 [S+1={S + 1}], got {seg_offsets.dtype} "
                         f"{tuple(seg_offsets.shape)}")
    if x.dtype not in DTYPES or A.dtype != x.dtype or B.dtype != x.dtype:
        raise ValueError(f"triton_lora_delta: x, A, B must share one of {DTYPES}, got {x.dtype}, {A.dtype}, {B.dtype}")
    if A.device != x.device or B.device != x.device:
        raise ValueError(f"triton_lora_delta: x, A, B must be on one device, got {x.device}, {A.device}, {B.device}")
    if INTERPRET and x.dtype == torch.bfloat16:
        # The interpreter runs tiles through numpy, which has no bfloat16: results would be garbage, not slow.
        raise ValueError("triton_lora_delta: bfloat16 is not supported under TRITON_INTERPRET=1; use fp32 or fp16")
    if x.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"triton_lora_delta: x is on {x.device}; the Triton kernel needs CUDA tensors "
                         "(or TRITON_INTERPRET=1 set before tagi_kernels is imported)")
    return LoraDeltaFunction.apply(x, A, B, seg_offsets, float(scale))
