"""A kernel added as docs/architecture.md says to add one: from this file alone, no file of the package touched.

``rowwise`` is a throwaway Triton kernel for the adapter op (one program per token row: its segment's ``A`` then
``B``; run by Triton's interpreter on a CPU, ``TRITON_INTERPRET=1`` from tests/conftest.py), with its autograd
wrapper (the backward from the torch reference, which is the specification) and one ``op_impls.OpImpl`` record
naming this module's functions. Registered, it is a valid ``model.adapter_impl``; the tiny model trains through it
(forward and every gradient equal to the reference's), and ``ops.RESOLVED`` counts the calls it served.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tagi_ds import op_impls, ops
from tagi_ds.config import ConfigError
from tests.core.helpers import make_batch, tiny_cfg, tiny_model

triton = pytest.importorskip("triton")
tl = triton.language


@triton.jit
def _rowwise_kernel(x_ptr, a_ptr, b_ptr, seg_ptr, out_ptr, d_in, d_out, r, scale, BI: tl.constexpr, BO: tl.constexpr,
                    BR: tl.constexpr):  # fmt: skip
    t = tl.program_id(0)
    s = tl.load(seg_ptr + t)
    i, k, o = tl.arange(0, BI), tl.arange(0, BR), tl.arange(0, BO)
    x = tl.load(x_ptr + t * d_in + i, mask=i < d_in, other=0.0).to(tl.float32)
    a_mask = (k[:, None] < r) & (i[None, :] < d_in)
    a = tl.load(a_ptr + s * r * d_in + k[:, None] * d_in + i[None, :], mask=a_mask, other=0.0).to(tl.float32)
    h = tl.sum(a * x[None, :], axis=1)  # [BR]: x A_s^T
    b_mask = (o[:, None] < d_out) & (k[None, :] < r)
    b = tl.load(b_ptr + s * d_out * r + o[:, None] * r + k[None, :], mask=b_mask, other=0.0).to(tl.float32)
    y = tl.sum(b * h[None, :], axis=1) * scale
    tl.store(out_ptr + t * d_out + o, y.to(out_ptr.dtype.element_ty), mask=o < d_out)


def _launch(x, A, B, seg_offsets, scale):
    T, d_in = x.shape
    S, r, _ = A.shape
    d_out = B.shape[1]
    out = torch.empty(T, d_out, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    seg = torch.repeat_interleave(torch.arange(S, device=x.device), seg_offsets.diff())  # each row's segment
    grid = (T,)
    pow2 = triton.next_power_of_2
    _rowwise_kernel[grid](
        x.contiguous(), A.contiguous(), B.contiguous(), seg, out, d_in, d_out, r, scale, pow2(d_in), pow2(d_out),
        pow2(r)
    )  # fmt: skip
    return out


class _RowwiseDelta(torch.autograd.Function):
    """The kernel forward; the backward is the reference's (differentiable in x, A and B, as the contract says)."""

    @staticmethod
    def forward(ctx, x, A, B, seg_offsets, scale):
        ctx.save_for_backward(x, A, B, seg_offsets)
        ctx.scale = scale
        return _launch(x, A, B, seg_offsets, scale)

    @staticmethod
    def backward(ctx, grad):
        x, A, B, seg_offsets = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (x, A, B)]
            ref = ops.lora_delta_torch(*leaves, seg_offsets, ctx.scale)
            gx, gA, gB = torch.autograd.grad(ref, leaves, grad)
        return gx, gA, gB, None, None


# The functions the record names: the public op's arguments (less impl, check_offsets) plus checked=True.
def rowwise_lora_delta(x, A, B, seg_offsets, scale, checked=True):
    return _RowwiseDelta.apply(x, A, B, seg_offsets, scale)


def rowwise_lora_delta_add_(out, x, A, B, seg_offsets, scale, checked=True):
    return out.add_(rowwise_lora_delta(x, A, B, seg_offsets, scale))


def rowwise_lora_linear(x, weight, bias, A, B, seg_offsets, scale, checked=True):
    return F.linear(x, weight, bias) + rowwise_lora_delta(x, A, B, seg_offsets, scale)


ROWWISE = op_impls.OpImpl(
    "rowwise",
    __name__,
    {
        "lora_delta": "rowwise_lora_delta",
        "lora_delta_add_": "rowwise_lora_delta_add_",
        "lora_linear": "rowwise_lora_linear",
    },
    needs="triton",
)


def test_the_kernel_matches_the_reference_in_forward_and_every_gradient():
    g = torch.Generator().manual_seed(0)
    offs = torch.tensor([0, 3, 3, 8, 11])  # an empty segment in the middle
    x = torch.randn(11, 24, generator=g, requires_grad=True)
    A = torch.randn(4, 5, 24, generator=g, requires_grad=True)  # r=5, d_in=24: no power of two, masked tiles
    B = torch.randn(4, 20, 5, generator=g, requires_grad=True)
    with op_impls.registered(ROWWISE):
        ops.RESOLVED.clear()
        got = ops.lora_delta(x, A, B, offs, 0.5, impl="rowwise")
        assert ops.RESOLVED == {"rowwise": 1}
        grads = torch.autograd.grad(got.square().sum(), (x, A, B))
        fused = ops.lora_linear_fused(x, B.new_ones(20, 24), None, A, B, offs, 0.5, impl="rowwise")  # its lora_linear
    want = ops.lora_delta_torch(x, A, B, offs, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for mine, ref in zip(grads, torch.autograd.grad(want.square().sum(), (x, A, B)), strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, x @ B.new_ones(24, 20) + want, rtol=1e-5, atol=1e-5)


def test_registered_it_is_a_model_adapter_impl_and_the_model_trains_through_it():
    with pytest.raises(ConfigError, match=r"model\.adapter_impl: must be one of auto, torch, triton \('rowwise'\)"):
        tiny_cfg(model={"adapter_impl": "rowwise"}).validate()
    with pytest.raises(ValueError, match="impl must be one of auto, torch, triton, got 'rowwise'"):
        ops.resolve_impl("rowwise", torch.empty(1))
    results = {}
    for impl in ("torch", "rowwise"):
        with op_impls.registered(ROWWISE):
            model = tiny_model("tiny", model={"adapter_impl": impl})
            model.cfg.validate()
            ops.RESOLVED.clear()
            loss, _ = model(make_batch("t5"))
            loss.backward()
            results[impl] = (
                loss.detach(),
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            )
            served = dict(ops.RESOLVED)
        assert set(served) == {impl} and served[impl] >= len(model.sites), served  # every adapted site, through it
    (loss_ref, grads_ref), (loss, grads) = results["torch"], results["rowwise"]
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and any(n.startswith("generator") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    assert "rowwise" not in op_impls.names()  # the registry is as it was
