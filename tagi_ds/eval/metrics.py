"""SNI metrics: exact match and ROUGE-L, computed as the official Super-NaturalInstructions script does.

Reference: allenai/natural-instructions ``eval/automatic/evaluation.py`` (default, English track):

- **exact match** compares ``normalize_answer(prediction) == normalize_answer(reference)``; the official
  normalisation lowercases, drops ``string.punctuation`` and collapses whitespace. It deliberately does
  *not* drop articles (its comment: "adapted from Squad v1.1 evaluation, without removing the articles"),
  so neither do we: "the cat" and "cat" are not an exact match.
- **ROUGE-L** is rouge-score's ``RougeScorer(['rougeL'], use_stemmer=True)`` F-measure on the *raw*
  strings (no ``normalize_answer``): its default tokeniser lowercases, turns every run of characters
  outside ``[a-z0-9]`` into a space, splits, and Porter-stems tokens longer than 3 characters. Both
  sides empty after tokenisation scores 0. The LCS and the tokeniser are re-implemented here (only the
  Porter stemmer is shared, nltk's, the one rouge-score uses), so tests against rouge-score are an
  independent check.
- each instance scores the **best** over its accepted answers (``metric_max_over_ground_truths``), ×100;
  the overall numbers are means over instances, and per task / per category over that group's instances.
  Category keys are normalised like the official script: ``"Textual Entailment"`` -> ``"textual_entailment"``.

The official script rounds its printed numbers to 4 decimals; :func:`compute_metrics` returns them
unrounded (round when presenting).
"""

from __future__ import annotations

import functools
import re
import string
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

_PUNCTUATION = frozenset(string.punctuation)
_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_VALID_TOKEN = re.compile(r"^[a-z0-9]+$")


def normalize_answer(text: str) -> str:
    """Lowercase, remove ASCII punctuation, collapse whitespace (official SNI ``normalize_answer``)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(text.split())


@functools.lru_cache(maxsize=1)
def _porter():
    # rouge-score's DefaultTokenizer(use_stemmer=True) uses nltk's PorterStemmer in its default
    # (NLTK_EXTENSIONS) mode; a different Porter variant would stem some words differently.
    from nltk.stem.porter import PorterStemmer

    return PorterStemmer()


@functools.lru_cache(maxsize=1 << 16)
def _stem(token: str) -> str:
    return _porter().stem(token)


def tokenize(text: str, stem: bool = True) -> list[str]:
    """rouge-score default tokenisation: lowercase, non-``[a-z0-9]`` runs -> space, stem words of > 3 chars."""
    tokens = _NON_ALNUM.sub(" ", text.lower()).split()
    if stem:
        tokens = [_stem(tok) if len(tok) > 3 else tok for tok in tokens]
    # Mirrors rouge-score's final validity filter (a stem is re-checked to be a plain [a-z0-9] token).
    return [tok for tok in tokens if _VALID_TOKEN.match(tok)]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (O(len(a)·len(b)), one row)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for tok_a in a:
        prev_diag = 0
        for j, tok_b in enumerate(b, start=1):
            prev_row_j = row[j]
            row[j] = prev_diag + 1 if tok_a == tok_b else max(row[j], row[j - 1])
            prev_diag = prev_row_j
    return row[-1]


def rouge_l_fmeasure(prediction: str, reference: str) -> float:
    """ROUGE-L F1 in [0, 1] between one prediction and one reference (rouge-score's ``rougeL.fmeasure``)."""
    pred_tokens, ref_tokens = tokenize(prediction), tokenize(reference)
    if not pred_tokens or not ref_tokens:
        return 0.0
    lcs = lcs_length(ref_tokens, pred_tokens)
    precision, recall = lcs / len(pred_tokens), lcs / len(ref_tokens)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def metric_max_over_ground_truths(
    metric_fn: Callable[[str, str], float], prediction: str, references: Sequence[str]
) -> float:
    """Best score of ``prediction`` over the accepted answers; an empty answer list is an error."""
    if isinstance(references, str):
        raise ValueError(f"references must be a list of accepted answers, got the string {references!r}")
    if len(references) == 0:
        raise ValueError("references is empty: every instance needs at least one accepted answer")
    return max(metric_fn(prediction, ref) for ref in references)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """100.0 if the normalised prediction equals any normalised reference, else 0.0."""
    return 100.0 * metric_max_over_ground_truths(
        lambda p, r: float(normalize_answer(p) == normalize_answer(r)), prediction, references
    )


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Best ROUGE-L F-measure over the references, ×100 (0..100)."""
    return 100.0 * metric_max_over_ground_truths(rouge_l_fmeasure, prediction, references)


def category_key(category: str) -> str:
    """Official per-category key: lowercase, whitespace runs -> ``_``."""
    return "_".join(category.lower().split())


def _summary(scores: list[tuple[float, float]]) -> dict[str, float | int]:
    n = len(scores)
    return {"rougeL": sum(s[0] for s in scores) / n, "exact_match": sum(s[1] for s in scores) / n, "num_examples": n}


def compute_metrics(predictions: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Score prediction records and average them overall, per task and per category.

    Each record: ``id`` (unique), ``task``, ``prediction`` (str), ``references`` (list[str], non-empty)
    and optionally ``category`` (str; either every record has one or none does).
    Returns ``{"rougeL", "exact_match", "num_examples", "per_task": {task: {...}},
    "per_category": {category_key: {...}}}`` with scores in 0..100; ``per_category`` is empty when no
    record has a category.
    """
    seen: set[str] = set()
    overall: list[tuple[float, float]] = []
    per_task: dict[str, list[tuple[float, float]]] = defaultdict(list)
    per_category: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with_category = None
    for i, rec in enumerate(predictions):
        where = f"prediction record {i} (id {rec.get('id')!r})"
        for key in ("id", "task", "prediction", "references"):
            if key not in rec:
                raise ValueError(f"{where} has no {key!r} field")
        if rec["id"] in seen:
            raise ValueError(f"{where}: duplicate id")
        seen.add(rec["id"])
        if not isinstance(rec["prediction"], str):
            raise ValueError(f"{where}: prediction must be a str, got {rec['prediction']!r}")
        has_category = rec.get("category") is not None
        if with_category is None:
            with_category = has_category
        elif has_category != with_category:
            raise ValueError(f"{where}: 'category' must be given for every record or for none")
        try:
            score = (rouge_l(rec["prediction"], rec["references"]), exact_match(rec["prediction"], rec["references"]))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err
        overall.append(score)
        per_task[rec["task"]].append(score)
        if has_category:
            per_category[category_key(rec["category"])].append(score)
    if not overall:
        raise ValueError("compute_metrics: no prediction records")
    return {
        **_summary(overall),
        "per_task": {task: _summary(s) for task, s in sorted(per_task.items())},
        "per_category": {cat: _summary(s) for cat, s in sorted(per_category.items())},
    }
