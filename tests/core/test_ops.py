"""The adapter op's torch reference against a per-example loop of dense matmuls (float64)."""

import pytest
import torch

from tagi_ds.ops import lora_delta


def dense_loop(x, A, B, offsets, scale):
    out = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype)
    for s in range(A.shape[0]):
        for t in range(int(offsets[s]), int(offsets[s + 1])):
            out[t] = scale * (B[s] @ (A[s] @ x[t]))
    return out


def random_layout(g, S, max_len):
    lengths = torch.randint(0, max_len + 1, (S,), generator=g)
    lengths[0] = 0  # always one empty segment
    if S > 1:
        lengths[1] = 1  # and one single-token segment
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


@pytest.mark.parametrize("S", [1, 2, 5, 9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_dense_loop_float64(S, seed):
    g = torch.Generator().manual_seed(seed)
    offsets = random_layout(g, S, 6)
    T, d_in, d_out, r = int(offsets[-1]), 7, 5, 3
    x = torch.randn(T, d_in, dtype=torch.float64, generator=g)
    A = torch.randn(S, r, d_in, dtype=torch.float64, generator=g)
    B = torch.randn(S, d_out, r, dtype=torch.float64, generator=g)
    got = lora_delta(x, A, B, offsets, scale=0.7, impl="torch")
    torch.testing.assert_close(got, dense_loop(x, A, B, offsets, 0.7), rtol=1e-12, atol=1e-12)


def test_gradcheck():
    g = torch.Generator().manual_seed(3)
    offsets = torch.tensor([0, 0, 1, 4, 4, 6])
    x = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    A = torch.randn(5, 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(5, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, A, B: lora_delta(x, A, B, offsets, 1.3, impl="torch"), (x, A, B))


def test_all_empty_segments_give_zero_and_zero_grads():
    x = torch.randn(0, 4, requires_grad=True)
    A = torch.randn(2, 2, 4, requires_grad=True)
    B = torch.randn(2, 3, 2, requires_grad=True)
    out = lora_delta(x, A, B, torch.tensor([0, 0, 0]), impl="torch")
    assert out.shape == (0, 3)
    out.sum().backward()
    assert torch.count_nonzero(A.grad) == 0 and torch.count_nonzero(B.grad) == 0


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(x=torch.randn(4)), "x must be"),
        (dict(A=torch.randn(2, 4)), "A must be"),
        (dict(B=torch.randn(3, 5, 2)), "B must be"),
        (dict(seg=torch.tensor([0, 2, 4], dtype=torch.int32)), "seg_offsets must be int64"),
        (dict(seg=torch.tensor([0, 5, 4])), "non-decreasing"),
        (dict(seg=torch.tensor([1, 2, 4])), "start at 0"),
        (dict(seg=torch.tensor([0, 2, 5])), "end at T=4"),
        (dict(impl="cuda"), "impl must be"),
    ],
)
def test_bad_arguments_name_the_argument(args, match):
    x, A, B = torch.randn(4, 3), torch.randn(2, 2, 3), torch.randn(2, 5, 2)
    seg = torch.tensor([0, 2, 4])
    with pytest.raises(ValueError, match=match):
        lora_delta(
            args.get("x", x), args.get("A", A), args.get("B", B), args.get("seg", seg), impl=args.get("impl", "torch")
        )


def test_auto_picks_torch_on_cpu():
    from tagi_ds.ops import resolve_impl

    assert resolve_impl("auto", torch.randn(2, 2)) == "torch"


def test_offsets_are_validated_once_per_adapter_set_not_per_layer():
    from tagi_ds.adapters import AdapterSet

    with pytest.raises(ValueError, match="non-decreasing"):
        AdapterSet({}, torch.tensor([0, 3, 2]), 1.0)
    assert AdapterSet({}, torch.tensor([0, 2, 5]), 1.0).num_examples == 5
    # The layers' path skips only the content checks (host syncs); shapes are still checked.
    x, A, B = torch.randn(4, 3), torch.randn(2, 2, 3), torch.randn(2, 5, 2)
    got = lora_delta(x, A, B, torch.tensor([0, 1, 4]), impl="torch", check_offsets=False)
    torch.testing.assert_close(got, lora_delta(x, A, B, torch.tensor([0, 1, 4]), impl="torch"))
    with pytest.raises(ValueError, match="x has d_in"):
        lora_delta(torch.randn(4, 7), A, B, torch.tensor([0, 2, 4]), impl="torch", check_offsets=False)
