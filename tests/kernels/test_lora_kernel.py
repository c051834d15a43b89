"""The Triton LoRA kernels against float64 references: forward, all gradients, odd layouts and shapes, and the three
entry points (delta, in-place add into an output, whole adapted linear).

Without a GPU the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py before triton is imported), in
fp32 and fp16 at tiny shapes. GPU-marked tests repeat the checks in bf16/fp16/fp32 at realistic sizes.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import tagi_kernels
from tagi_ds import ops
from tagi_kernels import launch, triton_lora_delta, triton_lora_delta_add_, triton_lora_linear
from tagi_kernels.launch import seg_reduce

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Segment lengths: empty segments first/middle/last, single-token segments, one task, many tasks. Totals are
# not multiples of the interpreter's 16-row tiles, so row masks are exercised too.
LAYOUTS = {
    "one_task": [37],
    "many_mixed": [3, 0, 1, 17, 0, 9, 1, 6],
    "singles": [1, 1, 1, 1, 1, 1, 1],
    "empty_edges": [0, 0, 21, 0, 16, 0],
    "long_and_short": [33, 1],
}


def offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64, device=DEVICE)


def random_lengths(gen: torch.Generator, S: int, T: int) -> list[int]:
    """S segment lengths summing to T, with cut points drawn uniformly (so empty and short segments occur)."""
    cuts = torch.sort(torch.randint(0, T + 1, (S - 1,), generator=gen)).values.tolist()
    bounds = [0, *cuts, T]
    return [bounds[i + 1] - bounds[i] for i in range(S)]


def make_inputs(lengths, d_in, d_out, r, dtype=torch.float32, seed=0):
    """x, A, B in ``dtype`` (scaled so the delta is O(1)), leaf tensors that require grad, and the offsets."""
    gen = torch.Generator().manual_seed(seed)
    T, S = sum(lengths), len(lengths)
    x = torch.randn(T, d_in, generator=gen)
    A = torch.randn(S, r, d_in, generator=gen) / d_in**0.5
    B = torch.randn(S, d_out, r, generator=gen) / r**0.5
    leaves = [t.to(device=DEVICE, dtype=dtype).requires_grad_() for t in (x, A, B)]
    return (*leaves, offsets(lengths))


def loop_reference(x, A, B, offs, scale):
    """The specification in its plainest form: one dense matmul pair per segment."""
    out = [
        scale * (x[lo:hi] @ A[s].T) @ B[s].T for s, (lo, hi) in enumerate(zip(offs[:-1].tolist(), offs[1:].tolist()))
    ]
    return torch.cat(out) if out else x.new_zeros(0, B.shape[1])


def value_and_grads(fn, x, A, B, offs, scale, dy):
    y = fn(x, A, B, offs, scale)
    return (y, *torch.autograd.grad(y, (x, A, B), dy))


def float64_truth(x, A, B, offs, scale, dy):
    """Forward and gradients in float64 from the (rounded) inputs, by the per-segment loop."""
    leaves = [t.detach().double().requires_grad_() for t in (x, A, B)]
    return value_and_grads(loop_reference, *leaves, offs, scale, dy.double())


def assert_matches(got, want, rtol, atol, names=("y", "dx", "dA", "dB")):
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("d_in,d_out,r", [(40, 45, 4), (17, 48, 8)])
def test_forward_and_grads_match_float64(layout, d_in, d_out, r):
    x, A, B, offs = make_inputs(LAYOUTS[layout], d_in, d_out, r)
    dy = torch.randn(x.shape[0], d_out, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = value_and_grads(triton_lora_delta, x, A, B, offs, 0.5, dy)
    assert_matches(got, float64_truth(x, A, B, offs, 0.5, dy), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_layouts_match_torch_reference(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    S = int(torch.randint(1, 12, (1,), generator=gen))
    lengths = random_lengths(gen, S, int(torch.randint(1, 41, (1,), generator=gen)))
    d_in, d_out = (int(v) for v in torch.randint(1, 49, (2,), generator=gen))
    r = [4, 8][seed % 2]
    x, A, B, offs = make_inputs(lengths, d_in, d_out, r, seed=seed)
    dy = torch.randn(x.shape[0], d_out, generator=gen).to(DEVICE)
    got = value_and_grads(triton_lora_delta, x, A, B, offs, 2.0, dy)
    # tagi_ds.ops' gather/bmm reference in float64 is the op's specification.
    leaves = [t.detach().double().requires_grad_() for t in (x, A, B)]
    want = value_and_grads(ops.lora_delta_torch, *leaves, offs, 2.0, dy.double())
    assert_matches(got, want, rtol=1e-4, atol=1e-4)


def test_fp16_under_the_same_kernel():
    x, A, B, offs = make_inputs(LAYOUTS["many_mixed"], 32, 24, 8, dtype=torch.float16)
    dy = torch.randn(x.shape[0], 24, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.float16)
    got = value_and_grads(triton_lora_delta, x, A, B, offs, 1.0, dy)
    assert got[0].dtype == torch.float16 and all(g.dtype == torch.float16 for g in got[1:])
    assert_matches(got, float64_truth(x, A, B, offs, 1.0, dy), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    "needs", [(False, True, True), (True, False, False), (False, False, True), (False, True, False)]
)
def test_partial_requires_grad(needs):
    """Only the requested gradients come back, and they are right (dX skipped, dA alone, dB alone...)."""
    x, A, B, offs = make_inputs(LAYOUTS["many_mixed"], 24, 20, 4)
    for t, need in zip((x, A, B), needs):
        t.requires_grad_(need)
    dy = torch.randn(x.shape[0], 20, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    y = triton_lora_delta(x, A, B, offs, 0.3)
    wanted = [t for t, need in zip((x, A, B), needs) if need]
    grads = torch.autograd.grad(y, wanted, dy)
    truth = float64_truth(x, A, B, offs, 0.3, dy)
    torch.testing.assert_close(y.double(), truth[0], rtol=1e-4, atol=1e-4)
    truth_grads = [g for g, need in zip(truth[1:], needs) if need]
    assert_matches(grads, truth_grads, rtol=1e-4, atol=1e-4, names=[n for n, k in zip("xAB", needs) if k])


def test_non_contiguous_inputs():
    x, A, B, offs = make_inputs(LAYOUTS["many_mixed"], 24, 20, 8)
    # Same values, transposed / strided storage.
    xt = x.detach().T.contiguous().T.requires_grad_()
    At = A.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    Bw = torch.zeros(B.shape[0], B.shape[1], 2 * B.shape[2], device=DEVICE)
    Bw[:, :, ::2] = B.detach()
    Bs = Bw[:, :, ::2].requires_grad_()
    assert not (xt.is_contiguous() or At.is_contiguous() or Bs.is_contiguous())
    dy = torch.randn(x.shape[0], 20, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    got = value_and_grads(triton_lora_delta, xt, At, Bs, offs, 1.0, dy.T.contiguous().T)
    assert_matches(got, float64_truth(x, A, B, offs, 1.0, dy), rtol=1e-4, atol=1e-4)


def test_checkpoint_recompute_is_exact():
    """Under checkpoint(use_reentrant=False) the op is recomputed; deterministic kernels give identical grads."""
    x, A, B, offs = make_inputs(LAYOUTS["many_mixed"], 24, 20, 8)
    dy = torch.randn(x.shape[0], 20, generator=torch.Generator().manual_seed(6)).to(DEVICE)

    def block(x, A, B):
        return torch.tanh(triton_lora_delta(x, A, B, offs, 0.7))

    plain = torch.autograd.grad(block(x, A, B), (x, A, B), dy)
    ckpt = torch.autograd.grad(checkpoint(block, x, A, B, use_reentrant=False), (x, A, B), dy)
    again = torch.autograd.grad(block(x, A, B), (x, A, B), dy)
    for p, c, a in zip(plain, ckpt, again):
        assert torch.equal(p, c) and torch.equal(p, a)


@pytest.mark.parametrize("S", [0, 2])
def test_no_tokens(S):
    offs = torch.zeros(S + 1, dtype=torch.int64, device=DEVICE)
    x = torch.zeros(0, 8, device=DEVICE, requires_grad=True)
    A = torch.randn(S, 4, 8, device=DEVICE, requires_grad=True)
    B = torch.randn(S, 6, 4, device=DEVICE, requires_grad=True)
    y = triton_lora_delta(x, A, B, offs, 1.0)
    assert y.shape == (0, 6)
    dx, dA, dB = torch.autograd.grad(y.sum(), (x, A, B))  # the Function still hands back (zero) gradients
    assert dx.shape == (0, 8) and dA.shape == A.shape and dB.shape == B.shape
    assert not dA.any() and not dB.any()


@pytest.mark.parametrize("splits", [1, 3])
def test_weight_grad_reduction_with_token_splits(splits):
    """out[s] = scale * U_s^T V_s, whether a segment is reduced by one program or by chunks summed afterwards;
    U given as two split-K partials (as the shrink writes it); written through a transposed view, as dB is."""
    gen = torch.Generator().manual_seed(splits)
    lengths = [0, 37, 1, 0, 5]
    offs = offsets(lengths)
    u = torch.zeros(2, sum(lengths), 16)
    u[:, :, :5] = torch.randn(2, sum(lengths), 5, generator=gen)  # rank 5 padded to 16 with zeros, as H is
    v = torch.randn(sum(lengths), 21, generator=gen)
    out = torch.full((len(lengths), 21, 5), float("nan")).transpose(1, 2)  # [S, R, D] view of [S, D, R]
    seg_reduce(u.to(DEVICE), v.to(DEVICE), out, offs, 0.5, splits)
    bounds, u_sum = offs.tolist(), u.sum(0)
    want = torch.stack(
        [0.5 * u_sum[lo:hi, :5].double().T @ v[lo:hi].double() for lo, hi in zip(bounds[:-1], bounds[1:])]
    )
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_plans_fill_the_grid_without_splitting_too_far(monkeypatch):
    """The GPU launch geometry (planned on the host, H200: 132 SMs): split-K and column spans only when the row tiles
    are too few, K chunks and spans aligned to every tile of the autotune space, token chunks of >= 256 tokens and
    fp32 partials at most half the pass they split."""
    monkeypatch.setattr(launch, "INTERPRET", False)
    monkeypatch.setattr(launch, "_sm_count", lambda index: 132)
    dev = torch.device("cuda", 0)
    assert launch.plan_k_split(8192, 4096, dev) == (4, 1024)
    assert launch.plan_k_split(65536, 4096, dev) == (1, 4096)  # 1024 row tiles fill 132 SMs on their own
    assert launch.plan_k_split(64, 300, dev) == (1, 512)  # narrow K: no split
    for T, K in ((8192, 2048), (1000, 11008), (1, 8192)):
        ksplit, k_chunk = launch.plan_k_split(T, K, dev)
        assert k_chunk % 256 == 0 and (ksplit - 1) * k_chunk < K <= ksplit * k_chunk
    assert launch.plan_column_span(8192, 4096, dev) == 1024  # 128 row tiles x 4 spans
    assert launch.plan_column_span(65536, 4096, dev) == 4096
    assert launch.plan_token_splits(8192, 1, 2048, 16, dev) == 16  # one task: 16 x 16 column blocks
    assert launch.plan_token_splits(8192, 4, 8192, 64, dev) == 3  # capped: 3 x [4, 64, 8192] fp32 partials
    assert launch.plan_token_splits(8192, 64, 4096, 16, dev) == 1


def test_bad_arguments_raise_value_error():
    x, A, B, offs = make_inputs([3, 4], 8, 8, 4)
    with pytest.raises(ValueError, match="share"):
        triton_lora_delta(x.double(), A, B, offs)
    with pytest.raises(ValueError, match="seg_offsets"):
        triton_lora_delta(x, A, B, offs.to(torch.int32))
    with pytest.raises(ValueError, match="shapes disagree"):
        triton_lora_delta(x, A, B[:1], offs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter-only check")
def test_bf16_refused_under_interpreter():
    x, A, B, offs = make_inputs([3, 4], 16, 16, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        triton_lora_delta(x, A, B, offs)


def test_the_op_contract_is_validated_once_per_call(monkeypatch):
    """tagi_ds.ops checks the contract (check_args) and tells the kernel so: the kernel's own copy of the shape
    checks runs only for a direct caller (it ran on every adapted layer's call before)."""
    from tagi_kernels import lora_delta as kernel_module

    x, A, B, offs = make_inputs([3, 4], 8, 8, 4)
    calls = []
    real = kernel_module._check_contract
    monkeypatch.setattr(kernel_module, "_check_contract", lambda *a: calls.append(a[0]) or real(*a))
    ops.lora_delta(x, A, B, offs, 0.5, impl="triton")
    assert calls == []
    triton_lora_delta(x, A, B, offs, 0.5)
    assert calls == ["triton_lora_delta"]


def test_public_op_dispatches_to_the_kernel(monkeypatch):
    x, A, B, offs = make_inputs(LAYOUTS["many_mixed"], 24, 20, 4)
    y = ops.lora_delta(x, A, B, offs, 0.5, impl="triton")
    torch.testing.assert_close(
        y.double(), loop_reference(*(t.detach().double() for t in (x, A, B)), offs, 0.5), rtol=1e-4, atol=1e-4
    )
    # Prove which path each impl takes: a sentinel kernel is reached by "triton", never by "auto" on CPU.
    calls = []
    monkeypatch.setattr(tagi_kernels, "triton_lora_delta", lambda *a, **k: calls.append(a) or a[0].new_zeros(0))
    ops.lora_delta(x, A, B, offs, 0.5, impl="triton")
    assert len(calls) == 1
    if not x.is_cuda:
        assert ops.resolve_impl("auto", x) == "torch"
        y_auto = ops.lora_delta(x, A, B, offs, 0.5, impl="auto")
        assert len(calls) == 1 and y_auto.shape == (x.shape[0], 20)


# ---------------------------------------------------------------- in place into an output; the whole adapted linear


def add_into(base):
    """``lora_delta_add_`` as a function of (x, A, B): into a fresh copy of ``base`` (the base linear's output)."""
    return lambda x, A, B, offs, scale: triton_lora_delta_add_(base.clone(), x, A, B, offs, scale)


@pytest.mark.parametrize("layout", ["many_mixed", "singles", "one_task"])
def test_add_into_output_matches_float64(layout):
    x, A, B, offs = make_inputs(LAYOUTS[layout], 40, 45, 8)
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(x.shape[0], 45, generator=gen).to(DEVICE)
    dy = torch.randn(x.shape[0], 45, generator=gen).to(DEVICE)
    got = value_and_grads(add_into(base), x, A, B, offs, 0.5, dy)
    y, *grads = float64_truth(x, A, B, offs, 0.5, dy)
    assert_matches(got, (y + base.double(), *grads), rtol=1e-4, atol=1e-4)


def test_add_into_strided_output_keeps_the_rest_and_passes_its_gradient():
    """out is a column slice of a wider buffer (row stride != d_out) and a non-leaf in the graph: the columns around
    it stay untouched, and its gradient is dY unchanged (out + delta is linear in out)."""
    x, A, B, offs = make_inputs(LAYOUTS["empty_edges"], 24, 20, 4)
    wide = torch.randn(x.shape[0], 33, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    before = wide.clone()
    w = torch.ones((), device=DEVICE, requires_grad=True)
    buf = wide * w  # a non-leaf, so autograd allows the in-place update and tracks the gradient to w
    out = triton_lora_delta_add_(buf[:, 5:25], x, A, B, offs, 2.0)
    assert out.data_ptr() == buf[:, 5:25].data_ptr() and not out.is_contiguous()
    delta = float64_truth(x, A, B, offs, 2.0, torch.zeros(x.shape[0], 20, device=DEVICE))[0]
    torch.testing.assert_close(out.double(), before[:, 5:25].double() + delta, rtol=1e-4, atol=1e-4)
    assert torch.equal(buf[:, :5], before[:, :5]) and torch.equal(buf[:, 25:], before[:, 25:])
    dy = torch.randn(x.shape[0], 33, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    (gw,) = torch.autograd.grad(buf, (w,), dy)  # d<dy, wide * w + [0, delta, 0]>/dw = <dy, wide>
    torch.testing.assert_close(gw.double(), (dy.double() * before.double()).sum(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("with_bias", [False, True])
def test_lora_linear_matches_float64(with_bias):
    """The whole adapted linear (delta written, base GEMM added onto it): output and the gradients of x, A, B,
    and of the weight and bias when they train."""
    x, A, B, offs = make_inputs(LAYOUTS["many_mixed"], 40, 45, 8)
    gen = torch.Generator().manual_seed(14)
    W = (torch.randn(45, 40, generator=gen) / 40**0.5).to(DEVICE).requires_grad_(with_bias)
    b = torch.randn(45, generator=gen).to(DEVICE).requires_grad_() if with_bias else None
    dy = torch.randn(x.shape[0], 45, generator=gen).to(DEVICE)
    leaves = (x, A, B, W, b) if with_bias else (x, A, B)
    y = triton_lora_linear(x, W, b, A, B, offs, 0.5)
    got = (y, *torch.autograd.grad(y, leaves, dy))

    def truth_fn(x, A, B, W, b):
        return torch.nn.functional.linear(x, W, b) + loop_reference(x, A, B, offs, 0.5)

    t_leaves = [t.detach().double().requires_grad_() for t in (x, A, B, W, b if with_bias else torch.zeros(45))]
    y64 = truth_fn(*t_leaves)
    want = (y64, *torch.autograd.grad(y64, t_leaves[: len(leaves)], dy.double()))
    assert_matches(got, want, rtol=1e-4, atol=1e-4, names=("y", "dx", "dA", "dB", "dW", "db"))


def test_new_entry_points_with_no_tokens():
    offs = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    x = torch.zeros(0, 8, device=DEVICE, requires_grad=True)
    A = torch.randn(2, 4, 8, device=DEVICE, requires_grad=True)
    B = torch.randn(2, 6, 4, device=DEVICE, requires_grad=True)
    W = torch.randn(6, 8, device=DEVICE)
    for y in (
        triton_lora_linear(x, W, None, A, B, offs),
        triton_lora_delta_add_(torch.zeros(0, 6, device=DEVICE) * 1, x, A, B, offs),
    ):
        assert y.shape == (0, 6)
        dx, dA, dB = torch.autograd.grad(y.sum(), (x, A, B))
        assert dx.shape == (0, 8) and not dA.any() and not dB.any()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_public_in_place_and_linear_ops_agree_with_the_reference(impl):
    x, A, B, offs = make_inputs(LAYOUTS["long_and_short"], 24, 20, 4)
    W = torch.randn(20, 24, generator=torch.Generator().manual_seed(15)).to(DEVICE)
    base = x.detach() @ W.T
    want = base.double() + loop_reference(*(t.detach().double() for t in (x, A, B)), offs, 0.5)
    added = ops.lora_delta_add_(base.clone(), x, A, B, offs, 0.5, impl=impl)
    linear = ops.lora_linear(x, W, None, A, B, offs, 0.5, impl=impl)
    for got in (added, linear):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="out must be"):
        ops.lora_delta_add_(base[:, :5].clone(), x, A, B, offs, impl=impl)
    with pytest.raises(ValueError, match="weight must be"):
        ops.lora_linear(x, W.T, None, A, B, offs, impl=impl)


# ---------------------------------------------------------------- GPU: real dtypes, realistic sizes
# Sized to compile in well under a minute with TAGI_KERNELS_TUNE=fixed (one config per kernel; the GPU stage sets
# it): every test shares d_in / d_out, so the kernels compile once per (dtype, rank bucket, stride pattern).
# d_in = 1056 gives the forward shrink two uneven K chunks and the dX expand a partial last column span; d_out = 520
# is not a multiple of 16 (masked columns, unaligned rows).

GPU_TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
GPU_D_IN, GPU_D_OUT = 1056, 520


def gpu_lengths(S: int, seed: int) -> list[int]:
    """S segments over ~2000 tokens; with several tasks, an empty and a one-token segment in the middle."""
    if S == 1:
        return [2000]
    lengths = random_lengths(torch.Generator().manual_seed(seed), S - 2, 2000)
    return lengths[: S // 2] + [0, 1] + lengths[S // 2 :]


def assert_close_to_truth(got, truth, ref, dtype, names):
    """Max error relative to the truth's max, within the dtype's tolerance and not far above the unfused torch
    reference's own error (same dtype, same inputs)."""
    for name, g, t, rf in zip(names, got, truth, ref):
        assert torch.isfinite(g).all(), f"{name} {dtype}: non-finite values"
        scale = t.abs().max().item() + 1e-6
        err = (g.double() - t).abs().max().item() / scale
        err_ref = (rf.double() - t).abs().max().item() / scale
        assert err < GPU_TOL[dtype], f"{name} {dtype}: rel err {err:.2e}"
        assert err <= 2 * err_ref + GPU_TOL[dtype] / 4, f"{name} {dtype}: {err:.2e} vs reference {err_ref:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("r", [8, 16, 64])
def test_gpu_64_tasks_match_float64(dtype, r):
    """64 tasks with an empty and a one-token segment: the delta and its three gradients, the in-place add and the
    whole adapted linear, against float64."""
    gen = torch.Generator().manual_seed(r)
    x, A, B, offs = make_inputs(gpu_lengths(64, r), GPU_D_IN, GPU_D_OUT, r, dtype=dtype, seed=r)
    dy = torch.randn(x.shape[0], GPU_D_OUT, generator=gen).to(DEVICE, dtype)
    got = value_and_grads(triton_lora_delta, x, A, B, offs, 0.5, dy)
    truth = float64_truth(x, A, B, offs, 0.5, dy)
    ref = value_and_grads(ops.lora_delta_torch, x, A, B, offs, 0.5, dy)  # same dtype, unfused
    assert_close_to_truth(got, truth, ref, dtype, ("y", "dx", "dA", "dB"))

    W = (torch.randn(GPU_D_OUT, GPU_D_IN, generator=gen) / GPU_D_IN**0.5).to(DEVICE, dtype)
    base = x.detach() @ W.T
    y_add = triton_lora_delta_add_(base.clone(), x.detach(), A.detach(), B.detach(), offs, 0.5)
    y_lin = triton_lora_linear(x, W, None, A, B, offs, 0.5)
    (dx_lin,) = torch.autograd.grad(y_lin, (x,), dy)
    y_truth = base.double() + truth[0]
    dx_truth = dy.double() @ W.double() + truth[1]
    y_ref = base + ref[0]
    dx_ref = dy @ W + ref[1]
    assert_close_to_truth(
        (y_add, y_lin, dx_lin),
        (y_truth, y_truth, dx_truth),
        (y_ref, y_ref, dx_ref),
        dtype,
        ("y add_", "y linear", "dx linear"),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("r", [16, 64])
def test_gpu_one_task_split_paths_deterministic(r):
    """One task: the shrink split over d_in and the weight gradients split over tokens (fp32 partials summed in a
    fixed order). Right against float64 and bitwise identical from run to run; likewise at 64 tasks."""
    gen = torch.Generator().manual_seed(7)
    for S in (1, 64):
        x, A, B, offs = make_inputs(gpu_lengths(S, 7), GPU_D_IN, GPU_D_OUT, r, dtype=torch.bfloat16, seed=S)
        dy = torch.randn(x.shape[0], GPU_D_OUT, generator=gen).to(DEVICE, torch.bfloat16)
        first = value_and_grads(triton_lora_delta, x, A, B, offs, 1.0, dy)
        second = value_and_grads(triton_lora_delta, x, A, B, offs, 1.0, dy)
        assert all(torch.equal(a, b) for a, b in zip(first, second)), f"S={S}: not deterministic"
        if S == 1:
            truth = float64_truth(x, A, B, offs, 1.0, dy)
            ref = value_and_grads(ops.lora_delta_torch, x, A, B, offs, 1.0, dy)
            assert_close_to_truth(first, truth, ref, torch.bfloat16, ("y", "dx", "dA", "dB"))
