"""Launchers of the LoRA kernels and the launch geometry they plan from the shapes (see lora_kernels.py).

The geometry is picked here, per call, from ``T``, the dims and the number of SMs, and reaches the kernels as plain
ints (no recompilation when the batch shape changes): the split-K of the shrink, the column span of the expand and
the token chunks of the weight-gradient reduction. Each aims at about ``WAVES`` programs per SM, the least that
keeps a bandwidth-bound kernel's loads in flight on every SM, while keeping the extra traffic it costs (the
re-read ``H`` partials, the fp32 gradient partials) small next to the pass over ``x`` or ``dY`` that it splits.
"""

from __future__ import annotations

import functools

import torch
import triton

from .lora_kernels import (
    BLOCK_D_GPU,
    BLOCK_M_GPU,
    INTERPRET,
    K_CHUNK_ALIGN,
    MIN_DOT,
    expand_kernel,
    seg_reduce_kernel,
    shrink_kernel,
    sum_splits_kernel,
)

WAVES = 4


def pad_rank(r: int) -> int:
    """Rank as seen by the kernels: a power of two (tl.arange) and at least the minimum dot size."""
    return max(MIN_DOT, triton.next_power_of_2(max(r, 1)))


def row_tile() -> int:
    return MIN_DOT if INTERPRET else BLOCK_M_GPU


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs_wanted(device: torch.device) -> int:
    return WAVES * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _round_up(n: int, to: int) -> int:
    return triton.cdiv(n, to) * to


def plan_k_split(T: int, K: int, device: torch.device) -> tuple[int, int]:
    """``(ksplit, k_chunk)`` of the shrink: few row tiles (few tokens) -> split K so the SMs fill; each chunk keeps
    >= 512 columns, and the consumers re-read ``ksplit`` fp32 partials of ``[T, R_PAD]`` (small next to x)."""
    if INTERPRET:
        k_chunk = _round_up(triton.cdiv(K, 2), MIN_DOT) if K > MIN_DOT else K  # exercise the split at test sizes
        return triton.cdiv(K, max(k_chunk, 1)), max(k_chunk, 1)
    tiles = triton.cdiv(T, BLOCK_M_GPU)
    want = min(triton.cdiv(_programs_wanted(device), tiles), max(1, K // 512), 8)
    k_chunk = _round_up(triton.cdiv(K, want), K_CHUNK_ALIGN)
    return triton.cdiv(K, k_chunk), k_chunk


def plan_column_span(T: int, N: int, device: torch.device) -> int:
    """Output columns per expand program: the whole row when there are enough row tiles, else split so the grid
    fills the SMs. Each program reads its rows' ``H`` partials once per span."""
    if INTERPRET:
        return 2 * MIN_DOT  # two column blocks per span, several spans at test sizes
    tiles = triton.cdiv(T, BLOCK_M_GPU)
    spans = min(triton.cdiv(_programs_wanted(device), tiles), triton.cdiv(N, K_CHUNK_ALIGN))
    return _round_up(triton.cdiv(N, max(spans, 1)), K_CHUNK_ALIGN)


def plan_token_splits(T: int, S: int, D: int, r_pad: int, device: torch.device) -> int:
    """Chunks per segment for the weight-gradient reduction. One program per (segment, column block) leaves most
    SMs idle with few tasks (S=1, d=2048: 16 programs); splitting each segment's tokens fills them, at the price
    of fp32 partials ``[n, S, r, D]`` written and summed: kept to at most half of the pass over ``[T, D]`` that is
    being reduced, and chunks of >= 256 tokens."""
    if INTERPRET:
        return 2 if T >= 2 * MIN_DOT * max(S, 1) else 1  # exercise both paths at test sizes
    S = max(S, 1)
    want = triton.cdiv(_programs_wanted(device), S * triton.cdiv(D, BLOCK_D_GPU))
    return max(1, min(want, T // (256 * S), T // (8 * S * r_pad), 16))


def _input_precision(dtype: torch.dtype) -> str:
    # Only fp32 x fp32 dots have a choice; follow torch's own matmul setting so that impl="triton" and
    # impl="torch" agree on whether fp32 means IEEE or TF32.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def shrink(x: torch.Tensor, w1: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Split-K partials of ``H = x W1_s^T`` per segment: fp32 ``[ksplit, T, R_PAD]`` (sum over dim 0 = H).

    x ``[T, K]``, w1 ``[S, R, K]`` (any strides; the backward passes ``B^T`` as a view)."""
    T, K = x.shape
    S, R, _ = w1.shape
    r_pad = pad_rank(R)
    ksplit, k_chunk = plan_k_split(T, K, x.device)
    hp = torch.empty(ksplit, T, r_pad, device=x.device, dtype=torch.float32)
    bm = row_tile()
    shrink_kernel[(triton.cdiv(T, bm), ksplit)](
        x,
        w1,
        hp,
        offs,
        T,
        S,
        K,
        R,
        k_chunk,
        x.stride(0),
        x.stride(1),
        w1.stride(0),
        w1.stride(1),
        w1.stride(2),
        hp.stride(0),
        hp.stride(1),
        BLOCK_M=bm,
        R_PAD=r_pad,
        IN_PREC=_input_precision(x.dtype),
    )
    return hp


def expand(
    hp: torch.Tensor, w2: torch.Tensor, offs: torch.Tensor, scale: float, y: torch.Tensor, add: bool
) -> torch.Tensor:
    """``y = scale * H W2_s^T`` per segment (``add``: ``y += ...`` in place), ``H`` = sum of the partials ``hp``.

    hp fp32 ``[ksplit, T, R_PAD]``, w2 ``[S, N, R]``, y ``[T, N]`` (any strides: an output view is fine)."""
    _, T, r_pad = hp.shape
    S, N, R = w2.shape
    span = plan_column_span(T, N, y.device)
    bm = row_tile()
    expand_kernel[(triton.cdiv(T, bm), triton.cdiv(N, span))](
        hp,
        w2,
        y,
        offs,
        T,
        S,
        N,
        R,
        hp.shape[0],
        span,
        float(scale),
        hp.stride(0),
        hp.stride(1),
        w2.stride(0),
        w2.stride(1),
        w2.stride(2),
        y.stride(0),
        y.stride(1),
        BLOCK_M=bm,
        R_PAD=r_pad,
        ADD=add,
        IN_PREC=_input_precision(w2.dtype),
    )
    return y


def seg_reduce(
    up: torch.Tensor, v: torch.Tensor, out: torch.Tensor, offs: torch.Tensor, scale: float, splits: int | None = None
) -> torch.Tensor:
    """``out[s] = scale * U_s^T V_s`` per segment, ``U`` = sum of the partials ``up``.

    up fp32 ``[usplit, T, R_PAD]``, v ``[T, D]``, out ``[S, R, D]`` (any strides, e.g. a transposed view of dB).
    One launch, plus one fixed-order sum of fp32 partials when the tokens are split (``splits``: the planner's
    choice when None)."""
    S, R, D = out.shape
    T, r_pad = up.shape[1], up.shape[2]
    if splits is None:
        splits = plan_token_splits(T, S, D, r_pad, v.device)
    target = out if splits == 1 else torch.empty(splits, S, R, D, device=out.device, dtype=torch.float32)
    stride_oc = 0 if splits == 1 else target.stride(0)
    t_s, t_r, t_d = target.stride()[-3:]
    block_d = MIN_DOT if INTERPRET else BLOCK_D_GPU
    seg_reduce_kernel[(S * splits, triton.cdiv(D, block_d))](
        up,
        v,
        target,
        offs,
        D,
        R,
        up.shape[0],
        splits,
        float(scale),
        up.stride(0),
        up.stride(1),
        v.stride(0),
        v.stride(1),
        stride_oc,
        t_s,
        t_r,
        t_d,
        R_PAD=r_pad,
        IN_PREC=_input_precision(v.dtype),
        BLOCK_D=block_d,
    )
    if splits > 1:
        block = 256 if INTERPRET else 1024
        numel = S * R * D
        sum_splits_kernel[(triton.cdiv(numel, block),)](
            target,
            out,
            splits,
            numel,
            R,
            D,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            BLOCK=block,
        )
    return out
