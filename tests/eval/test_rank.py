"""P3 rank classification: length-normalised option scores, grouping, accuracy aggregation."""

import math

import pytest
import torch

from tagi_ds.eval.rank import (
    IGNORE_INDEX,
    MTEST11,
    accuracy,
    choice_scores,
    group_argmax,
    rank_classify,
    summarize_accuracy,
)

V = 7


def _logits_for(logps: list[float], targets: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One pair whose target token t has exactly log-prob ``logps[t]``; positions past it are padding."""
    logits = torch.randn(length, V)  # padding positions: arbitrary
    labels = torch.full((length,), IGNORE_INDEX)
    for t, (lp, y) in enumerate(zip(logps, targets)):
        p = torch.full((V,), (1 - math.exp(lp)) / (V - 1), dtype=torch.float64)
        p[y] = math.exp(lp)
        logits[t] = p.log().float() + 3.0  # a constant shift must not matter
        labels[t] = y
    return logits, labels


def _pairs(spec):
    length = max(len(lps) for lps, _ in spec)
    built = [_logits_for(lps, ys, length) for lps, ys in spec]
    return torch.stack([b[0] for b in built]), torch.stack([b[1] for b in built])


def test_length_normalisation_decides():
    # choice 0: 1 token at -1.2 (best sum, -1.2); choice 1: 2 tokens at -1.0 (sum -2.0, mean -1.0);
    # choice 2: 4 tokens at -0.5 (sum -2.0, best mean -0.5).
    logits, labels = _pairs([([-1.2], [3]), ([-1.0, -1.0], [1, 2]), ([-0.5] * 4, [4, 0, 6, 5])])
    scores = choice_scores(logits, labels)
    assert scores.tolist() == pytest.approx([-1.2, -1.0, -0.5], abs=1e-5)
    sums = choice_scores(logits, labels, length_normalize=False)
    assert sums.tolist() == pytest.approx([-1.2, -2.0, -2.0], abs=1e-5)
    assert rank_classify(logits, labels, [3]).tolist() == [2]
    assert group_argmax(sums, [3]).tolist() == [0]  # the unnormalised sum would pick the shortest option


def test_padding_is_ignored_even_with_inf_logits():
    logits, labels = _pairs([([-0.3], [1]), ([-0.2, -0.1, -0.4], [1, 2, 3])])
    logits[0, 1:] = float("-inf")  # padding positions of pair 0
    scores = choice_scores(logits, labels)
    assert torch.isfinite(scores).all()
    assert scores.tolist() == pytest.approx([-0.3, (-0.2 - 0.1 - 0.4) / 3], abs=1e-5)


def test_choice_scores_match_brute_force():
    torch.manual_seed(0)
    N, L = 9, 6
    logits = torch.randn(N, L, V) * 3
    labels = torch.randint(0, V, (N, L))
    lengths = torch.randint(1, L + 1, (N,))
    for n in range(N):
        labels[n, lengths[n] :] = IGNORE_INDEX
    expected = []
    for n in range(N):
        logp = torch.log_softmax(logits[n].double(), dim=-1)
        expected.append(sum(logp[t, labels[n, t]].item() for t in range(int(lengths[n]))) / int(lengths[n]))
    assert choice_scores(logits, labels).tolist() == pytest.approx(expected, abs=1e-5)
    half = choice_scores(logits.bfloat16(), labels)
    assert half.dtype == torch.float32
    # Decoder-only alignment: logits[t] predicts labels[t + 1].
    shifted = choice_scores(
        torch.cat([logits, torch.randn(N, 1, V)], 1), torch.cat([torch.full((N, 1), 5), labels], 1), shift=True
    )
    assert shifted.tolist() == pytest.approx(expected, abs=1e-5)


def test_group_argmax_variable_choices_and_ties():
    torch.manual_seed(1)
    num_choices = [2, 3, 1, 5, 4]
    scores = torch.randn(sum(num_choices))
    got = group_argmax(scores, num_choices)
    start, expected = 0, []
    for c in num_choices:
        expected.append(int(torch.argmax(scores[start : start + c])))
        start += c
    assert got.tolist() == expected
    # Ties go to the first option; -inf options are allowed.
    assert group_argmax(torch.tensor([1.0, 1.0, 0.0, float("-inf"), 2.0]), torch.tensor([3, 2])).tolist() == [0, 1]
    assert group_argmax(torch.tensor([float("-inf"), float("-inf")]), [2]).tolist() == [0]


def test_rank_classify_end_to_end_accuracy():
    # Two examples: (2 options, gold 1), (3 options, gold 0); the model gets the first right only.
    logits, labels = _pairs(
        [
            ([-2.0], [1]),
            ([-0.1, -0.3], [2, 2]),  # example 0 -> option 1
            ([-0.9], [0]),
            ([-0.2], [4]),
            ([-0.7, -0.7], [5, 6]),  # example 1 -> option 1 (gold 0)
        ]
    )
    pred = rank_classify(logits, labels, torch.tensor([2, 3]))
    assert pred.tolist() == [1, 1]
    assert accuracy(pred, [1, 0]) == pytest.approx(50.0)


def test_summarize_accuracy_means_prompts_then_datasets():
    per_prompt = {"anli_r1": {"p1": 30.0, "p2": 40.0, "p3": 50.0}, "super_glue_cb": {"p1": 80.0}}
    out = summarize_accuracy(per_prompt)
    assert out["per_dataset"] == {"anli_r1": pytest.approx(40.0), "super_glue_cb": pytest.approx(80.0)}
    assert out["accuracy"] == pytest.approx(60.0)  # not the mean over the 4 prompts (50.0)
    assert out["num_datasets"] == 2 and not out["complete"]
    assert len(out["missing"]) == 9 and "story_cloze" in out["missing"]
    full = summarize_accuracy({name: {"a": float(i), "b": float(i) + 2} for i, name in enumerate(MTEST11)})
    assert full["complete"] and full["missing"] == []
    assert full["accuracy"] == pytest.approx(sum(i + 1 for i in range(11)) / 11)
    assert len(MTEST11) == 11


def test_errors_name_the_problem():
    logits, labels = _pairs([([-1.0], [1]), ([-1.0], [2])])
    with pytest.raises(ValueError, match="labels must be"):
        choice_scores(logits, labels[:, :0])
    with pytest.raises(ValueError, match="no target token"):
        choice_scores(logits, torch.full_like(labels, IGNORE_INDEX))
    with pytest.raises(ValueError, match="outside"):
        choice_scores(logits, torch.full_like(labels, V))
    with pytest.raises(ValueError, match="sums to 3"):
        group_argmax(torch.zeros(2), [1, 2])
    with pytest.raises(ValueError, match=">= 1"):
        group_argmax(torch.zeros(2), [2, 0])
    with pytest.raises(ValueError, match="NaN"):
        group_argmax(torch.tensor([float("nan"), 0.0]), [2])
    with pytest.raises(ValueError, match="unknown datasets"):
        summarize_accuracy({"anli_r4": {"p": 1.0}})
    with pytest.raises(ValueError, match="must be equal"):
        accuracy(torch.tensor([0, 1]), [0])
