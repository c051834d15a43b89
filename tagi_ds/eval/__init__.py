"""Evaluation: SNI exact match / ROUGE-L (official-script semantics) and P3 rank classification."""

from tagi_ds.eval.metrics import (
    compute_metrics,
    exact_match,
    normalize_answer,
    rouge_l,
    rouge_l_fmeasure,
    tokenize,
)
from tagi_ds.eval.rank import (
    MTEST11,
    accuracy,
    choice_scores,
    group_argmax,
    rank_classify,
    summarize_accuracy,
)

__all__ = [
    "MTEST11",
    "accuracy",
    "choice_scores",
    "compute_metrics",
    "exact_match",
    "group_argmax",
    "normalize_answer",
    "rank_classify",
    "rouge_l",
    "rouge_l_fmeasure",
    "summarize_accuracy",
    "tokenize",
]
