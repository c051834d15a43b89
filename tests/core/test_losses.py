"""KL and parameter alignment: zero exactly when they should be, and like-with-like comparisons."""

import pytest
import torch

from tagi_ds.losses import kl_loss, param_alignment, target_rows


def test_kl_zero_for_identical_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(10, 17, generator=g)
    assert kl_loss(s, s.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-7)
    t = torch.randn(10, 17, generator=g)
    assert kl_loss(s, t, 2.0).item() > 1e-3


def test_kl_has_t_squared_factor_and_direction():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    T = 3.0
    p_t = torch.softmax(t / T, -1)
    manual = (p_t * (p_t.log() - torch.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    torch.testing.assert_close(kl_loss(s, t, T), manual)


def test_target_rows_shift_for_causal():
    logits = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, -100]])
    got, lab = target_rows(logits, labels, causal=True)
    assert lab.tolist() == [5, 6, 7] and got.squeeze(-1).tolist() == [1.0, 2.0, 4.0]


def _factors(g, K=3, r=4, d_in=6, d_out=5, sites=(0, 1)):
    return {s: (torch.randn(K, r, d_in, generator=g), torch.randn(K, d_out, r, generator=g)) for s in sites}


def test_param_alignment_zero_when_equal_both_modes():
    g = torch.Generator().manual_seed(2)
    f = _factors(g)
    for mode in ("delta", "factors"):
        assert param_alignment(f, 0.5, f, 0.5, mode).item() == pytest.approx(0.0, abs=1e-5)


def test_delta_alignment_equals_dense_mse_and_respects_scale():
    g = torch.Generator().manual_seed(3)
    gen, tea = _factors(g, r=4), _factors(g, r=8)  # different ranks are fine for deltas
    got = param_alignment(gen, 2.0, tea, 0.25, "delta")
    dense = torch.stack(
        [((2.0 * gen[s][1] @ gen[s][0] - 0.25 * tea[s][1] @ tea[s][0]) ** 2).mean((1, 2)) for s in gen]
    ).mean()
    torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-4)
    # The same delta factored differently (A scaled up, B down) is the same adapter: zero loss.
    same = {s: (a * 4.0, b / 2.0) for s, (a, b) in gen.items()}
    assert param_alignment(gen, 2.0, same, 1.0, "delta").item() == pytest.approx(0.0, abs=1e-3)


def test_factors_alignment_compares_a_with_a_and_b_with_b():
    g = torch.Generator().manual_seed(4)
    gen = _factors(g)
    swapped = {s: (a.clone(), b.clone()) for s, (a, b) in gen.items()}
    # The official code's bug paired generated A with teacher B: here equal A's and equal B's give zero.
    assert param_alignment(gen, 1.0, swapped, 1.0, "factors").item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="equal ranks"):
        param_alignment(gen, 1.0, _factors(g, r=2), 1.0, "factors")
