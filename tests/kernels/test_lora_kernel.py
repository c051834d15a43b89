"""The fused Triton LoRA kernel against float64 references: forward, all three gradients, odd layouts and shapes.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py before triton is imported), in
fp32 and fp16 at tiny shapes. GPU-marked tests repeat the checks in bf16/fp16/fp32 at realistic sizes.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import tagi_kernels
from tagi_ds import ops
from tagi_kernels import block_table, triton_lora_delta
from tagi_kernels.lora_delta import seg_outer

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
    out = [scale * (x[lo:hi] @ A[s].T) @ B[s].T for s, (lo, hi) in enumerate(zip(offs[:-1].tolist(),
                                                                             offs[1:].tolist()))]
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


@pytest.mark.parametrize("needs", [(False, True, True), (True, False, False), (False, False, True),
                                   (False, True, False)])
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


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_block_table_tiles_every_row_once(block_m):
    gen = torch.Generator().manual_seed(block_m)
    for _ in range(5):
        S = int(torch.randint(1, 10, (1,), generator=gen))
        lengths = random_lengths(gen, S, int(torch.randint(0, 60, (1,), generator=gen)))
        offs = offsets(lengths).cpu()
        T = int(offs[-1])
        blk_seg, blk_row = block_table(offs, T, block_m)
        covered = torch.zeros(T, dtype=torch.int64)
        for s, row in zip(blk_seg.tolist(), blk_row.tolist()):
            if s < 0:
                continue
            lo, hi = int(offs[s]), int(offs[s + 1])
            assert lo <= row < hi, f"block starts at row {row} outside segment {s} = [{lo}, {hi})"
            assert (row - lo) % block_m == 0
            covered[row:min(row + block_m, hi)] += 1
        assert torch.equal(covered, torch.ones(T, dtype=torch.int64)), f"lengths {lengths}: coverage {covered}"
        # Unused entries are all at the tail: real blocks form a prefix, so the grid order is segment-major.
        valid = (blk_seg >= 0).tolist()
        assert valid == sorted(valid, reverse=True)


@pytest.mark.parametrize("splits", [1, 3])
def test_weight_grad_reduction_with_token_splits(splits):
    """out[s] = scale * U_s^T V_s, whether a segment is reduced by one program or by chunks summed afterwards;
    written through a transposed view, as dB is."""
    gen = torch.Generator().manual_seed(splits)
    lengths = [0, 37, 1, 0, 5]
    offs = offsets(lengths)
    u = torch.zeros(sum(lengths), 16)
    u[:, :5] = torch.randn(sum(lengths), 5, generator=gen)  # rank 5 padded to 16 with zeros, as the kernel writes H
    v = torch.randn(sum(lengths), 21, generator=gen)
    out = torch.full((len(lengths), 21, 5), float("nan")).transpose(1, 2)  # [S, R, D] view of [S, D, R]
    seg_outer(u.to(DEVICE), v.to(DEVICE), out, offs, 0.5, splits)
    bounds = offs.tolist()
    want = torch.stack([0.5 * u[lo:hi, :5].double().T @ v[lo:hi].double() for lo, hi in zip(bounds[:-1], bounds[1:])])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


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


def test_public_op_dispatches_to_the_kernel(monkeypatch):
    x, A, B, offs = make_inputs(LAYOUTS["many_mixed"], 24, 20, 4)
    y = ops.lora_delta(x, A, B, offs, 0.5, impl="triton")
    torch.testing.assert_close(y.double(), loop_reference(*(t.detach().double() for t in (x, A, B)), offs, 0.5),
                               rtol=1e-4, atol=1e-4)
    # Prove which path each impl takes: a sentinel kernel is reached by "triton", never by "auto" on CPU.
    calls = []
    monkeypatch.setattr(tagi_kernels, "triton_lora_delta", lambda *a: calls.append(a) or a[0].new_zeros(0))
    ops.lora_delta(x, A, B, offs, 0.5, impl="triton")
    assert len(calls) == 1
    if not x.is_cuda:
        assert ops.resolve_impl("auto", x) == "torch"
        y_auto = ops.lora_delta(x, A, B, offs, 0.5, impl="auto")
        assert len(calls) == 1 and y_auto.shape == (x.shape[0], 20)


# ---------------------------------------------------------------- GPU: real dtypes, realistic sizes, autotuning

GPU_TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("r", [8, 16, 64])
@pytest.mark.parametrize("S", [1, 7])
def test_gpu_dtypes_match_float64(dtype, r, S):
    gen = torch.Generator().manual_seed(r * 10 + S)
    lengths = [1000] if S == 1 else random_lengths(gen, S, 1000) + [0, 1]
    x, A, B, offs = make_inputs(lengths, 384, 520, r, dtype=dtype, seed=r)
    dy = torch.randn(x.shape[0], 520, generator=gen).to(DEVICE, dtype)
    got = value_and_grads(triton_lora_delta, x, A, B, offs, 0.5, dy)
    truth = float64_truth(x, A, B, offs, 0.5, dy)
    ref = value_and_grads(ops.lora_delta_torch, x, A, B, offs, 0.5, dy)  # same dtype, unfused
    for name, g, t, rf in zip(("y", "dx", "dA", "dB"), got, truth, ref):
        scale = t.abs().max().item() + 1e-6
        err = (g.double() - t).abs().max().item() / scale
        err_ref = (rf.double() - t).abs().max().item() / scale
        assert err < GPU_TOL[dtype], f"{name} {dtype}: rel err {err:.2e}"
        assert err <= 2 * err_ref + GPU_TOL[dtype] / 4, f"{name} {dtype}: {err:.2e} vs reference {err_ref:.2e}"


@pytest.mark.gpu
def test_gpu_many_tasks_deterministic():
    gen = torch.Generator().manual_seed(7)
    x, A, B, offs = make_inputs(random_lengths(gen, 64, 4096), 1024, 1024, 16, dtype=torch.bfloat16)
    dy = torch.randn(x.shape[0], 1024, generator=gen).to(DEVICE, torch.bfloat16)
    first = value_and_grads(triton_lora_delta, x, A, B, offs, 1.0, dy)
    second = value_and_grads(triton_lora_delta, x, A, B, offs, 1.0, dy)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
