r"""Per-task LoRA delta on Triton: the autograd Functions behind ``tagi_ds.ops.lora_delta`` / ``lora_delta_add_`` /
``lora_linear`` with ``impl="triton"``.

Shapes. ``x [T, d_in]`` holds tokens grouped by task; ``seg_offsets`` int64 ``[S+1]`` (non-decreasing,
``[0] = 0``, ``[S] = T``; segment ``s`` is rows ``seg_offsets[s]:seg_offsets[s+1]``, possibly empty);
``A [S, r, d_in]``, ``B [S, d_out, r]``, a Python scalar ``scale``. Result ``Y [T, d_out]``.

Forward, for the rows ``X_s [L_s, d_in]`` of segment ``s``::

    H_s = X_s A_s^T              [L_s, r]      (shrink: once per token tile, split over d_in when tokens are few)
    Y_s = scale * H_s B_s^T      [L_s, d_out]  (expand: writes Y, or adds into a given output in place)

Backward. Write ``dZ`` for the gradient dL/dZ and ``δZ`` for a perturbation, ``<P, Q> = tr(P^T Q)``. Then
``δY_s = scale * (δX_s A_s^T B_s^T + X_s δA_s^T B_s^T + H_s δB_s^T)`` and ``δL = <dY_s, δY_s>``; moving each
factor across the inner product (cyclic trace) reads off the gradients::

    <dY, δX A^T B^T> = <dY B A, δX>                                  =>  dX_s = scale * G_s A_s    [L_s, d_in]
    <dY, X δA^T B^T> = tr(dY^T X δA^T B^T) = tr(B^T dY^T X δA^T)
                     = <(dY B)^T X, δA>                               =>  dA_s = scale * G_s^T X_s  [r, d_in]
    <dY, H δB^T>     = tr(dY^T H δB^T) = <dY^T H, δB>                 =>  dB_s = scale * dY_s^T H_s [d_out, r]

    with G_s = dY_s B_s [L_s, r], the shrink of the output gradient.

So ``G`` is the forward's shrink with ``(x, A) -> (dY, B^T)`` and ``dX`` its expand with ``B -> A^T`` (the transposes
are stride views, not copies); ``dA`` and ``dB`` are per-segment sums over tokens, done as a segment-grouped GEMM
whose programs each walk a fixed run of tokens in order (deterministic, no float atomics; with few tasks the runs
are chunks of a segment whose fp32 partials are summed in a fixed order). Launches, whatever S is: 2 forward
(shrink, expand); backward: shrink + expand for dX, 1 each for dA and dB, plus one partial sum each when split.

Three entry points share these kernels:

* ``triton_lora_delta(x, A, B, offs, scale)`` returns the delta (the public op's contract);
* ``triton_lora_delta_add_(out, x, A, B, offs, scale)`` adds it into ``out`` in place (e.g. the base linear's
  output): the expand reads and writes ``out`` once instead of writing a delta that a separate add reads again;
* ``triton_lora_linear(x, weight, bias, A, B, offs, scale)`` is the whole adapted linear: the expand writes the delta
  and the base GEMM (cuBLAS, ``addmm_`` with beta = 1) adds ``x W^T`` onto it in its epilogue, in forward (``Y``) and
  backward (``dX = dY W + scale G A``), so neither the delta nor the LoRA part of ``dX`` is re-read by an add.

Numerics: accumulation is fp32; the r-wide intermediates are rounded to the input dtype before their second
matmul, like the unfused bf16/fp16 reference. ``lora_delta_add_`` and ``lora_linear`` round ``base + delta`` once
(the reference rounds the delta, then the sum). fp32 inputs use IEEE dots unless
``torch.backends.cuda.matmul.allow_tf32`` is set (then TF32, as torch does). Ranks are zero-padded to a power of
two >= 16 inside the kernels (tl.dot needs K >= 16); the padding never reaches the outputs.

The Functions are pure functions of their inputs (no state kept between calls besides Triton's autotune cache), so
they recompute correctly under ``torch.utils.checkpoint(use_reentrant=False)``. Inputs are made contiguous.
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd.function import once_differentiable

from .launch import expand, seg_reduce, shrink
from .lora_kernels import INTERPRET

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _device_of(t: torch.Tensor):
    # Triton launches on the current CUDA device; make it the tensors' one (a rank may hold several devices).
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _forward(ctx, x, A, B, seg_offsets, scale, y: torch.Tensor, add: bool) -> tuple:
    """Shared forward: ``y (+)= scale * (x A_s^T) B_s^T``; fills ctx for :func:`_backward`; returns what to save."""
    offs = seg_offsets.to(device=x.device, dtype=torch.int64).contiguous()
    ctx.scale = float(scale)
    ctx.empty = x.shape[0] == 0 or A.shape[1] == 0 or B.shape[1] == 0 or x.shape[1] == 0
    if ctx.empty:  # nothing to launch: the delta and every LoRA gradient are zero
        if not add:
            y.zero_()
        return x, A, B, offs, None
    with _device_of(x):
        hp = shrink(x, A, offs)
        expand(hp, B, offs, ctx.scale, y, add)
    return x, A, B, offs, hp if ctx.needs_b else None


def _backward(ctx, dy, x, A, B, offs, hp, need_x: bool, need_a: bool, need_b: bool, dx: torch.Tensor | None = None):
    """dX (written into ``dx`` when given), dA, dB of the delta; None where not needed."""
    if ctx.empty:
        return (
            torch.zeros_like(x) if need_x and dx is None else dx,
            torch.zeros_like(A) if need_a else None,
            torch.zeros_like(B) if need_b else None,
        )
    dy = dy.contiguous()
    dA = dB = None
    with _device_of(x):
        if need_x or need_a:
            # G = dY B (the forward's shrink with A -> B^T), then dX = scale * G A (its expand with B -> A^T).
            gp = shrink(dy, B.transpose(1, 2), offs)
            if need_x:
                dx = expand(
                    gp, A.transpose(1, 2), offs, ctx.scale, torch.empty_like(x) if dx is None else dx, add=False
                )
            if need_a:
                dA = seg_reduce(gp, x, torch.empty_like(A), offs, ctx.scale)
        if need_b:
            dB = torch.empty_like(B)
            seg_reduce(hp, dy, dB.transpose(1, 2), offs, ctx.scale)  # dB^T = s * H^T dY, via strides
    return dx, dA, dB


class LoraDeltaFunction(torch.autograd.Function):
    """``delta = scale * (x A_s^T) B_s^T``: 2 launches forward; dX, dA, dB backward, each skipped when unneeded."""

    @staticmethod
    def forward(ctx, x, A, B, seg_offsets, scale):
        x, A, B = x.contiguous(), A.contiguous(), B.contiguous()
        ctx.needs_b = ctx.needs_input_grad[2]
        y = torch.empty(x.shape[0], B.shape[1], device=x.device, dtype=x.dtype)
        saved = _forward(ctx, x, A, B, seg_offsets, scale, y, add=False)
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        grads = _backward(ctx, dy, *ctx.saved_tensors, *ctx.needs_input_grad[:3])
        return (*grads, None, None)


class LoraDeltaAddFunction(torch.autograd.Function):
    """``out += scale * (x A_s^T) B_s^T`` in place (the expand's epilogue reads and writes ``out``); returns out."""

    @staticmethod
    def forward(ctx, out, x, A, B, seg_offsets, scale):
        x, A, B = x.contiguous(), A.contiguous(), B.contiguous()
        ctx.needs_b = ctx.needs_input_grad[3]
        saved = _forward(ctx, x, A, B, seg_offsets, scale, out, add=True)
        ctx.mark_dirty(out)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        grads = _backward(ctx, dout, *ctx.saved_tensors, *ctx.needs_input_grad[1:4])
        return (dout if ctx.needs_input_grad[0] else None, *grads, None, None)


class LoraLinearFunction(torch.autograd.Function):
    """``x W^T + bias + scale * (x A_s^T) B_s^T``: the delta is written first and cuBLAS adds the base GEMM onto it
    (``addmm_``, beta = 1), in forward and for dX in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, seg_offsets, scale):
        x, A, B = x.contiguous(), A.contiguous(), B.contiguous()
        ctx.needs_b = ctx.needs_input_grad[4]
        y = torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)
        saved = _forward(ctx, x, A, B, seg_offsets, scale, y, add=False)
        y.addmm_(x, weight.t())
        if bias is not None:
            y.add_(bias)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(*saved, weight)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        *saved, weight = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dy = dy.contiguous()
        dx, dA, dB = _backward(ctx, dy, *saved, need_x, need_a, need_b)
        if need_x:
            dx.addmm_(dy, weight)  # dX = dY W + scale * G A, the GEMM adding onto the LoRA part
        dw = dy.t() @ saved[0] if need_w else None
        dbias = dy.sum(0) if need_bias and ctx.has_bias else None
        return dx, dw, dbias, dA, dB, None, None


def _check(
    name: str, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, seg_offsets: torch.Tensor, checked: bool = False
) -> None:
    """Shapes, dtypes and devices, without a host sync; the contents of ``seg_offsets`` (monotone, ends at 0 and T)
    are validated by ``tagi_ds.ops``, the public entry points. ``checked``: the caller (``tagi_ds.ops``, which
    validates the op contract once per call) did the shape/dtype part already; only what the kernels add (the
    dtypes they compile for, one device, CUDA or the interpreter) is checked, so an adapted layer pays one
    validation per call, not two."""
    if not checked:
        _check_contract(name, x, A, B, seg_offsets)
    if x.dtype not in DTYPES:
        raise ValueError(f"{name}: x, A, B must share one of {DTYPES}, got {x.dtype}, {A.dtype}, {B.dtype}")
    if A.device != x.device or B.device != x.device:
        raise ValueError(f"{name}: x, A, B must be on one device, got {x.device}, {A.device}, {B.device}")
    if INTERPRET and x.dtype == torch.bfloat16:
        # The interpreter runs tiles through numpy, which has no bfloat16: results would be garbage, not slow.
        raise ValueError(f"{name}: bfloat16 is not supported under TRITON_INTERPRET=1; use fp32 or fp16")
    if x.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"{name}: x is on {x.device}; the Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before tagi_kernels is imported)"
        )


def _check_contract(name: str, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, seg_offsets: torch.Tensor) -> None:
    """The op contract for a direct caller of the kernels (tests, benchmarks): ``tagi_ds.ops.check_args`` without
    the offsets' contents (tagi_kernels stands alone: it does not import tagi_ds)."""
    if x.dim() != 2 or A.dim() != 3 or B.dim() != 3:
        raise ValueError(
            f"{name}: want x [T, d_in], A [S, r, d_in], B [S, d_out, r], got "
            f"{tuple(x.shape)}, {tuple(A.shape)}, {tuple(B.shape)}"
        )
    S, r, d_in = A.shape
    if x.shape[1] != d_in or B.shape[0] != S or B.shape[2] != r:
        raise ValueError(f"{name}: shapes disagree: x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}")
    if seg_offsets.dim() != 1 or seg_offsets.numel() != S + 1 or seg_offsets.dtype != torch.int64:
        raise ValueError(
            f"{name}: seg_offsets must be int64 [S+1={S + 1}], got {seg_offsets.dtype} {tuple(seg_offsets.shape)}"
        )
    if A.dtype != x.dtype or B.dtype != x.dtype:
        raise ValueError(f"{name}: x, A, B must share one of {DTYPES}, got {x.dtype}, {A.dtype}, {B.dtype}")


def _check_output(name: str, what: str, t: torch.Tensor, x: torch.Tensor, d_out: int) -> None:
    if t.shape != (x.shape[0], d_out) or t.dtype != x.dtype or t.device != x.device:
        raise ValueError(
            f"{name}: {what} must be [T={x.shape[0]}, d_out={d_out}] {x.dtype} on {x.device}, got "
            f"{tuple(t.shape)} {t.dtype} on {t.device}"
        )


def triton_lora_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    seg_offsets: torch.Tensor,
    scale: float = 1.0,
    checked: bool = False,
) -> torch.Tensor:
    """``[T, d_out]`` per-segment ``scale * (x A_s^T) B_s^T``; differentiable in x, A, B."""
    _check("triton_lora_delta", x, A, B, seg_offsets, checked)
    return LoraDeltaFunction.apply(x, A, B, seg_offsets, float(scale))


def triton_lora_delta_add_(
    out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    seg_offsets: torch.Tensor,
    scale: float = 1.0,
    checked: bool = False,
) -> torch.Tensor:
    """``out += scale * (x A_s^T) B_s^T`` in place, returns ``out`` ``[T, d_out]`` (any strides; it must not overlap
    x). Differentiable in out, x, A, B; ``out`` must not be a leaf that requires grad (autograd's in-place rule)."""
    _check("triton_lora_delta_add_", x, A, B, seg_offsets, checked)
    _check_output("triton_lora_delta_add_", "out", out, x, B.shape[1])
    return LoraDeltaAddFunction.apply(out, x, A, B, seg_offsets, float(scale))


def triton_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    seg_offsets: torch.Tensor,
    scale: float = 1.0,
    checked: bool = False,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + scale * (x A_s^T) B_s^T`` ``[T, d_out]``; differentiable in every tensor."""
    _check("triton_lora_linear", x, A, B, seg_offsets, checked)
    if weight.dim() != 2 or weight.shape != (B.shape[1], x.shape[1]) or weight.dtype != x.dtype:
        raise ValueError(
            f"triton_lora_linear: weight must be [d_out={B.shape[1]}, d_in={x.shape[1]}] {x.dtype}, "
            f"got {tuple(weight.shape)} {weight.dtype}"
        )
    if bias is not None and (bias.shape != (B.shape[1],) or bias.dtype != x.dtype):
        raise ValueError(
            f"triton_lora_linear: bias must be [d_out={B.shape[1]}] {x.dtype}, got {tuple(bias.shape)} {bias.dtype}"
        )
    return LoraLinearFunction.apply(x, weight, bias, A, B, seg_offsets, float(scale))
