"""The adapter op: per-task low-rank deltas for tokens grouped by task.

Every adapted layer (generated adapters and the teacher bank alike) goes through :func:`lora_delta`.

    delta[t] = scale * (x[t] @ A[s].T) @ B[s].T      for rows t in segment s

Shapes: ``x [T, d_in]`` (tokens already grouped by task), ``A [S, r, d_in]``, ``B [S, d_out, r]``,
``seg_offsets`` int64 ``[S+1]`` non-decreasing with ``seg_offsets[0] = 0`` and ``seg_offsets[S] = T``
(segment ``s`` = rows ``seg_offsets[s]:seg_offsets[s+1]``, possibly empty). Returns ``[T, d_out]``.

``impl="torch"`` is the reference and the specification: segments are gathered into a padded
``[S, Lmax, d_in]`` block and multiplied with two batched matmuls (the r-wide intermediate is
materialised). Every other impl is a record in ``tagi_ds/op_impls.py``: ``impl="triton"`` is the fused kernel in
``kernels/`` (import name ``tagi_kernels``), and ``impl="auto"`` picks it for CUDA tensors when Triton imports and
the reference otherwise.

Two entry points sit beside it, same arguments and dispatch: :func:`lora_delta_add_` adds the delta into a given
output in place (the base linear's output: no delta tensor written and re-read by an add) and :func:`lora_linear`
is the whole adapted linear ``F.linear(x, weight, bias) + delta`` (the kernels write the delta and the base GEMM
adds onto it, in forward and for the input gradient). :func:`lora_linear_fused` is the same adapted linear as one
Triton GEMM per direction with the LoRA inside it (:func:`lora_linear_torch` is its reference). Costs of each:
kernels/NOTES.md.
"""

from __future__ import annotations

import collections
import functools
import importlib
import warnings

import torch
import torch.nn.functional as F

from tagi_ds import op_impls


def check_args(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, seg_offsets: torch.Tensor, check_offsets: bool = True
) -> None:
    """The op contract, checked once per call of the public ops (the kernels then check only what they add:
    ``tagi_kernels`` ``checked=True``). Raise ValueError naming the argument whose shape, dtype or content is
    wrong. The content checks of ``seg_offsets`` read it on the host (a device sync):
    ``check_offsets=False`` skips them."""
    if x.dim() != 2:
        raise ValueError(f"lora_delta: x must be [T, d_in], got shape {tuple(x.shape)}")
    if A.dim() != 3:
        raise ValueError(f"lora_delta: A must be [S, r, d_in], got shape {tuple(A.shape)}")
    if B.dim() != 3:
        raise ValueError(f"lora_delta: B must be [S, d_out, r], got shape {tuple(B.shape)}")
    S, r, d_in = A.shape
    if x.shape[1] != d_in:
        raise ValueError(f"lora_delta: x has d_in={x.shape[1]} but A has d_in={d_in}")
    if B.shape[0] != S or B.shape[2] != r:
        raise ValueError(f"lora_delta: B must be [S={S}, d_out, r={r}], got shape {tuple(B.shape)}")
    if A.dtype != x.dtype or B.dtype != x.dtype:
        raise ValueError(f"lora_delta: x, A, B must share a dtype, got {x.dtype}, {A.dtype}, {B.dtype}")
    if seg_offsets.dtype != torch.int64 or seg_offsets.dim() != 1 or seg_offsets.numel() != S + 1:
        raise ValueError(
            f"lora_delta: seg_offsets must be int64 [S+1={S + 1}], "
            f"got {seg_offsets.dtype} shape {tuple(seg_offsets.shape)}"
        )
    if not check_offsets:
        return
    first, last = int(seg_offsets[0]), int(seg_offsets[-1])
    if first != 0 or last != x.shape[0]:
        raise ValueError(f"lora_delta: seg_offsets must start at 0 and end at T={x.shape[0]}, got {first}..{last}")
    if S > 0 and bool((seg_offsets[1:] < seg_offsets[:-1]).any()):
        raise ValueError(f"lora_delta: seg_offsets must be non-decreasing, got {seg_offsets.tolist()}")


def lora_delta_torch(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, seg_offsets: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """Reference: gather segments into ``[S, Lmax, d_in]``, two bmm, keep the valid rows (in order)."""
    T, S, d_out = x.shape[0], A.shape[0], B.shape[1]
    lengths = seg_offsets[1:] - seg_offsets[:-1]  # [S]
    lmax = int(lengths.max()) if S > 0 else 0  # host sync: fine for the reference path
    if T == 0 or lmax == 0:
        # Keep the result attached to A and B so autograd sees zero gradients rather than None.
        return x.new_zeros(T, d_out) + 0.0 * (A.sum() + B.sum())
    pos = torch.arange(lmax, device=x.device)
    valid = pos[None, :] < lengths[:, None]  # [S, Lmax]
    idx = torch.where(valid, seg_offsets[:-1, None] + pos[None, :], 0)  # [S, Lmax]
    xp = x[idx] * valid[..., None].to(x.dtype)  # [S, Lmax, d_in]
    h = torch.bmm(xp, A.transpose(1, 2))  # [S, Lmax, r]
    yp = torch.bmm(h, B.transpose(1, 2))  # [S, Lmax, d_out]
    # Segments are contiguous and in order, so the valid rows of yp are exactly tokens 0..T-1.
    return yp[valid] * scale


# How many adapter-op calls each impl served (``resolve_impl``) since ``RESOLVED.clear()``: a benchmark row records
# which op it timed from this, rather than trusting ``impl="auto"`` to have picked the kernel.
RESOLVED: collections.Counter[str] = collections.Counter()
_warned_fallback = False


@functools.cache
def kernels_import_error(impl: str = "triton") -> str | None:
    """Why ``impl``'s module (``tagi_kernels``, with Triton, for triton) does not import here, or None when it does
    (tried once per process)."""
    try:
        importlib.import_module(op_impls.get(impl).module)
    except (ImportError, RuntimeError, OSError) as err:  # Triton raises RuntimeError/OSError without a usable driver
        return f"{type(err).__name__}: {err}"
    return None


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    """The impl that runs for ``impl`` on ``x``: ``auto`` is the first registered implementation that is auto on
    CUDA (``triton``) for CUDA tensors when its module imports, else ``torch``. On CUDA a failed import warns once,
    naming the error: the reference op is several times slower, and a run (or a benchmark row) must not time it as
    if it were the kernel. Counted in RESOLVED."""
    global _warned_fallback
    if impl not in op_impls.names():
        raise ValueError(f"lora_delta: impl must be one of {', '.join(op_impls.names())}, got {impl!r}")
    if impl == "auto":
        impl = "torch"
        if x.is_cuda:
            errors = []
            for candidate in (i for i in op_impls.IMPLS.values() if i.auto == "cuda"):
                if (err := kernels_import_error(candidate.name)) is None:
                    impl = candidate.name
                    break
                errors.append(f"{candidate.module} does not import ({err})")
            if impl == "torch" and errors and not _warned_fallback:
                _warned_fallback = True
                warnings.warn(
                    f"lora_delta: impl='auto' on CUDA runs the torch reference op: {'; '.join(errors)}",
                    RuntimeWarning,
                    stacklevel=3,
                )
    RESOLVED[impl] += 1
    return impl


def serves(impl: str, op: str) -> bool:
    """Whether the resolved ``impl`` has its own ``op`` (the torch reference serves every op)."""
    return impl == "torch" or op_impls.get(impl).serves(op)


def lora_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    seg_offsets: torch.Tensor,
    scale: float = 1.0,
    impl: str = "auto",
    check_offsets: bool = True,
) -> torch.Tensor:
    """``[T, d_out]`` per-segment ``scale * (x A_s^T) B_s^T``; differentiable in x, A and B.

    ``check_offsets=False`` is for callers that validated the offsets already (the adapted layers: once per
    forward in :class:`~tagi_ds.adapters.AdapterSet`, not once per layer, since each check syncs the device).
    """
    check_args(x, A, B, seg_offsets, check_offsets)
    if (name := resolve_impl(impl, x)) == "torch":
        return lora_delta_torch(x, A, B, seg_offsets, scale)
    return _served("lora_delta", name)(x, A, B, seg_offsets, scale, checked=True)


def lora_delta_add_(
    out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    seg_offsets: torch.Tensor,
    scale: float = 1.0,
    impl: str = "auto",
    check_offsets: bool = True,
) -> torch.Tensor:
    """``out += lora_delta(x, A, B, seg_offsets, scale)`` in place; returns ``out`` ``[T, d_out]`` (same dtype and
    device as x, any strides, not overlapping x). Differentiable in out, x, A and B, by autograd's in-place rules
    (``out`` may not be a leaf that requires grad)."""
    check_args(x, A, B, seg_offsets, check_offsets)
    want = (x.shape[0], B.shape[1])
    if tuple(out.shape) != want or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"lora_delta_add_: out must be {list(want)} {x.dtype} on {x.device}, "
            f"got {list(out.shape)} {out.dtype} on {out.device}"
        )
    if (name := resolve_impl(impl, x)) == "torch":
        return out.add_(lora_delta_torch(x, A, B, seg_offsets, scale))
    return _served("lora_delta_add_", name)(out, x, A, B, seg_offsets, scale, checked=True)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    seg_offsets: torch.Tensor,
    scale: float = 1.0,
    impl: str = "auto",
    check_offsets: bool = True,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + lora_delta(x, A, B, seg_offsets, scale)``, ``[T, d_out]``; weight
    ``[d_out, d_in]`` and bias ``[d_out]`` in x's dtype. Differentiable in every tensor."""
    check_args(x, A, B, seg_offsets, check_offsets)
    if weight.shape != (B.shape[1], x.shape[1]):
        raise ValueError(
            f"lora_linear: weight must be [d_out={B.shape[1]}, d_in={x.shape[1]}], got {list(weight.shape)}"
        )
    if (name := resolve_impl(impl, x)) == "torch":
        return lora_linear_torch(x, weight, bias, A, B, seg_offsets, scale)
    return _served("lora_linear", name)(x, weight, bias, A, B, seg_offsets, scale, checked=True)


def lora_linear_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    seg_offsets: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """Reference and specification of the adapted linear: ``F.linear(x, weight, bias)`` plus the per-task delta
    (:func:`lora_delta_torch`), rounded as two separate results and their sum."""
    return F.linear(x, weight, bias) + lora_delta_torch(x, A, B, seg_offsets, scale)


LINEAR_SHRINKS = ("auto", "fused", "split")


def lora_linear_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    seg_offsets: torch.Tensor,
    scale: float = 1.0,
    impl: str = "auto",
    check_offsets: bool = True,
    shrink: str = "auto",
) -> torch.Tensor:
    """The adapted linear with the LoRA inside the base GEMM (issue 26): same contract as :func:`lora_linear`.
    ``impl="triton"`` runs one fused Triton GEMM per direction (y and dX each written once); ``impl="torch"`` is
    :func:`lora_linear_torch`. ``shrink`` (triton only): ``fused`` computes ``x A_s^T`` from the GEMM's own x tiles,
    ``split`` runs the split-K shrink kernel first, ``auto`` picks by the cost model in kernels/NOTES.md."""
    check_args(x, A, B, seg_offsets, check_offsets)
    if weight.shape != (B.shape[1], x.shape[1]):
        raise ValueError(
            f"lora_linear_fused: weight must be [d_out={B.shape[1]}, d_in={x.shape[1]}], got {list(weight.shape)}"
        )
    if shrink not in LINEAR_SHRINKS:
        raise ValueError(f"lora_linear_fused: shrink must be one of {', '.join(LINEAR_SHRINKS)}, got {shrink!r}")
    if (name := resolve_impl(impl, x)) == "torch":
        return lora_linear_torch(x, weight, bias, A, B, seg_offsets, scale)
    if not serves(name, "lora_linear_fused"):  # the same contract: its own adapted linear
        return _served("lora_linear", name)(x, weight, bias, A, B, seg_offsets, scale, checked=True)
    return _served("lora_linear_fused", name)(x, weight, bias, A, B, seg_offsets, scale, shrink, checked=True)


def _served(op: str, impl: str):
    """The function of ``impl``'s module that serves ``op`` (op_impls' record names it)."""
    record = op_impls.get(impl)
    if not record.serves(op):
        raise RuntimeError(f"{op}: impl={impl!r} does not serve it (its record in tagi_ds/op_impls.py)")
    try:
        module = importlib.import_module(record.module)
    except ImportError as err:
        needs = record.needs or f"the {record.module} module"
        raise RuntimeError(f"{op}: impl={impl!r} needs {needs} ({err})") from err
    return getattr(module, record.functions[op])
