"""P3 / T0 rank classification: score every answer option, pick the best, aggregate accuracy.

An example with C answer options becomes C (example, choice) pairs that share the example's input and
differ in the target tokens. The model scores each pair by the **length-normalised** log-likelihood of
its target, ``mean_t log p(y_t | x, y_<t)`` over the real (non ``-100``) target tokens, and the option
with the highest score is the prediction (ties -> the first option). Accuracy is averaged over the
prompts (templates) of a dataset, then over datasets; the T0 held-out suite is :data:`MTEST11`.

Shapes: ``logits [N, L, V]`` and ``labels [N, L]`` for N pairs, pairs of one example contiguous and in
option order; ``num_choices [E]`` says how many pairs each of the E examples has (variable per example).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

IGNORE_INDEX = -100

# T0's held-out evaluation datasets (Sanh et al. 2022; TAGI reports their mean as "MTest11").
MTEST11 = (
    "anli_r1",
    "anli_r2",
    "anli_r3",
    "hellaswag",
    "super_glue_cb",
    "super_glue_copa",
    "super_glue_rte",
    "super_glue_wic",
    "super_glue_wsc",
    "winogrande",
    "story_cloze",
)


def choice_scores(
    logits: torch.Tensor, labels: torch.Tensor, length_normalize: bool = True, shift: bool = False
) -> torch.Tensor:
    """Log-likelihood of each pair's target, averaged over its real tokens: ``[N, L, V], [N, L] -> [N]``.

    ``logits[n, t]`` must be the distribution over ``labels[n, t]`` (a T5 decoder's output as is). For a
    decoder-only model whose ``logits[n, t]`` predicts token ``t + 1``, pass ``shift=True``.
    ``length_normalize=False`` gives the summed log-likelihood instead. Computed in float32.
    """
    if logits.dim() != 3:
        raise ValueError(f"choice_scores: logits must be [N, L, V], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"choice_scores: labels must be [N, L] = {tuple(logits.shape[:2])}, got shape {tuple(labels.shape)}"
        )
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        bad = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"choice_scores: labels rows {bad} have no target token (all {IGNORE_INDEX})")
    vocab = logits.shape[-1]
    safe = labels.masked_fill(~mask, 0)
    if bool(((safe < 0) | (safe >= vocab)).any()):
        raise ValueError(f"choice_scores: labels hold ids outside [0, {vocab}) other than {IGNORE_INDEX}")
    # log p(y) = logit[y] - logsumexp(logits): avoids materialising a second [N, L, V] log-softmax.
    logits = logits.float()
    token_logp = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    # where(), not a multiply: a padded position may hold -inf logits, and -inf * 0 is NaN.
    total = torch.where(mask, token_logp, torch.zeros_like(token_logp)).sum(dim=1)
    return total / counts if length_normalize else total


def _check_num_choices(num_choices: torch.Tensor | Sequence[int], n_pairs: int, device) -> torch.Tensor:
    num_choices = torch.as_tensor(num_choices, dtype=torch.long, device=device)
    if num_choices.dim() != 1 or num_choices.numel() == 0:
        raise ValueError(f"num_choices must be a non-empty 1-D sequence, got shape {tuple(num_choices.shape)}")
    if bool((num_choices < 1).any()):
        raise ValueError(f"num_choices must all be >= 1, got {num_choices.tolist()}")
    if int(num_choices.sum()) != n_pairs:
        raise ValueError(f"num_choices sums to {int(num_choices.sum())} but there are {n_pairs} scored pairs")
    return num_choices


def group_argmax(scores: torch.Tensor, num_choices: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Best option per example: ``scores [N]`` grouped by ``num_choices [E]`` -> option index ``[E]``.

    Pairs are scattered into a ``[E, max C]`` table padded with -inf, so one argmax covers all examples;
    on ties the first option wins.
    """
    if scores.dim() != 1:
        raise ValueError(f"group_argmax: scores must be [N], got shape {tuple(scores.shape)}")
    if bool(torch.isnan(scores).any()):
        raise ValueError("group_argmax: scores contain NaN")
    num_choices = _check_num_choices(num_choices, scores.numel(), scores.device)
    n_examples = num_choices.numel()
    example = torch.repeat_interleave(torch.arange(n_examples, device=scores.device), num_choices)
    starts = torch.cumsum(num_choices, 0) - num_choices
    position = torch.arange(scores.numel(), device=scores.device) - starts[example]
    table = scores.new_full((n_examples, int(num_choices.max())), float("-inf"))
    table[example, position] = scores
    # A row of all -inf (every option impossible) still has a valid argmax (0) among its real options.
    return table.argmax(dim=1)


def rank_classify(
    logits: torch.Tensor, labels: torch.Tensor, num_choices: torch.Tensor | Sequence[int], shift: bool = False
) -> torch.Tensor:
    """Predicted option index per example ``[E]`` by length-normalised log-likelihood."""
    return group_argmax(choice_scores(logits, labels, shift=shift), num_choices)


def accuracy(predictions: torch.Tensor, targets: torch.Tensor | Sequence[int]) -> float:
    """Percentage (0..100) of examples whose predicted option index equals the target."""
    targets = torch.as_tensor(targets, dtype=torch.long, device=predictions.device)
    if predictions.shape != targets.shape or predictions.dim() != 1 or predictions.numel() == 0:
        raise ValueError(
            f"accuracy: predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} "
            "must be equal non-empty [E]"
        )
    return 100.0 * (predictions == targets).float().mean().item()


def summarize_accuracy(per_prompt: Mapping[str, Mapping[str, float]], datasets: Sequence[str] = MTEST11) -> dict:
    """Prompt accuracies -> per-dataset means -> the mean over datasets.

    ``per_prompt[dataset][prompt]`` is a prompt's accuracy (0..100). Datasets outside ``datasets`` are an
    error (a misspelt name would otherwise silently drop out of the mean). Returns ``{"accuracy": mean over
    the datasets present, "per_dataset": {...}, "per_prompt": {...}, "num_datasets", "missing": [...],
    "complete": every dataset in ``datasets`` present}``; the MTest11 number is ``accuracy`` when
    ``complete``.
    """
    unknown = sorted(set(per_prompt) - set(datasets))
    if unknown:
        raise ValueError(f"summarize_accuracy: unknown datasets {unknown}; expected names from {list(datasets)}")
    per_dataset = {}
    for name in datasets:
        prompts = per_prompt.get(name)
        if prompts is None:
            continue
        if len(prompts) == 0:
            raise ValueError(f"summarize_accuracy: dataset {name!r} has no prompt results")
        per_dataset[name] = sum(prompts.values()) / len(prompts)
    if not per_dataset:
        raise ValueError("summarize_accuracy: no dataset results")
    missing = [name for name in datasets if name not in per_dataset]
    return {
        "accuracy": sum(per_dataset.values()) / len(per_dataset),
        "per_dataset": per_dataset,
        "per_prompt": {name: dict(per_prompt[name]) for name in per_dataset},
        "num_datasets": len(per_dataset),
        "missing": missing,
        "complete": not missing,
    }
