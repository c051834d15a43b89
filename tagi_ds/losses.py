"""Stage objectives: CE over label tokens, KL_T(teacher || student), and parameter alignment.

Both official-code bugs are avoided (README, "The method in one screen"): the KL compares the real teacher
distribution (never the student's logits standing in for it), and parameter alignment compares like with like,
in one scale.

Large vocabularies (128k-256k): training never holds logits ``[B, L, V]``. :func:`token_sums` takes the
final hidden states at the N target tokens and the LM head, and computes every token term (``tagi_ds.loss_terms``:
CE, KL, any registered one) ``loss.chunk_tokens`` target tokens at a time under activation checkpointing: a
chunk's logits and its fp32 softmax temporaries live only while that chunk is computed (forward), or recomputed
(backward). ``ce_loss`` and ``kl_loss`` are the specification it is tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def target_rows(x: torch.Tensor, labels: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a per-position tensor ``x [B, L, *]`` (logits or hidden states) at real target positions, and
    their labels: ``([N, *], [N])`` in example-major token order.

    T5: ``x[b, t]`` predicts ``labels[b, t]``. Decoder-only: ``x[b, t]`` predicts ``labels[b, t+1]``.
    Teacher and student views of the same examples give the same N tokens in the same order.
    """
    if causal:
        x, labels = x[:, :-1], labels[:, 1:]
    keep = labels != -100
    return x[keep], labels[keep]


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over ``[N, V]`` / ``[N]`` target tokens (float32 softmax)."""
    return F.cross_entropy(logits.float(), labels)


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * mean_tokens KL(softmax(teacher/T) || softmax(student/T))`` over ``[N, V]`` target tokens."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"kl_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} target "
            "tokens differ: both views must carry the same labels"
        )
    t = temperature
    log_p_t = F.log_softmax(teacher.float() / t, dim=-1)
    log_p_s = F.log_softmax(student.float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return kl.mean() * t * t if kl.numel() else student.sum() * 0.0


def ce_sum(student: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed CE over one chunk of target rows: the ``ce`` term (``tagi_ds.loss_terms``)."""
    return F.cross_entropy(student, labels, reduction="sum")


def kl_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Summed ``T^2``-scaled ``KL(softmax(teacher/T) || softmax(student/T))`` over one chunk of fp32 logits: the
    ``kl`` term. The teacher's side needs no gradient: computed, and recomputed in backward, under no_grad."""
    t = temperature
    with torch.no_grad():
        log_p_t = F.log_softmax(teacher / t, dim=-1)
    return (log_p_t.exp() * (log_p_t - F.log_softmax(student / t, dim=-1))).sum() * t * t


def _chunk_sums(
    head: Callable[[torch.Tensor], torch.Tensor],
    student: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor | None,
    lc,
    terms: tuple,
    on: tuple[bool, ...],
    teacher_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``[T]``: each token term's sum over one chunk of target rows (0 for a term that is off). The teacher view's
    logits are made once, when the first term that reads them comes, under no_grad, by ``teacher_head`` (a
    separate teacher model's own head, ``tagi_ds.teacher_model``) or else ``head``."""
    s = head(student).float()
    t = None
    sums = []
    for term, is_on in zip(terms, on):
        if not is_on:
            sums.append(s.new_zeros(()))
            continue
        if term.teacher_view and t is None:
            with torch.no_grad():
                t = (teacher_head or head)(teacher).float()
        sums.append(term.fn(s, labels, t if term.teacher_view else None, lc))
    return torch.stack(sums)


def token_sums(
    head: Callable[[torch.Tensor], torch.Tensor],
    student: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor | None,
    lc,
    columns: tuple,
    on: list,
    teacher_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The mean over the N target tokens of each token term in ``on`` (``tagi_ds.loss_terms``), from ``head``'s
    logits, ``lc.chunk_tokens`` rows at a time.

    ``student [N, d]`` and ``teacher [N, d]`` (None when no term in ``on`` reads the teacher view) are the rows
    :func:`target_rows` picks (hidden states; or logits with an identity ``head``), ``labels [N]``. ``columns``:
    every registered token term (``loss_terms.token_terms``), each a column of the per-chunk sums (0 where it
    is off), so the built-in CE and KL sum as they did before the registry.

    Each chunk runs under non-reentrant activation checkpointing, so what autograd keeps is the rows
    themselves; the largest tensors ever alive are one chunk's: its logits
    ``[chunk, V]`` in the head's dtype and a few fp32 ``[chunk, V]`` (softmax / log-softmax of student and
    teacher), in forward and again in backward, where the chunk is recomputed (one more LM-head matmul per
    view). Under ZeRO-3 ``head`` calls the LM-head module, so every call gathers its weight. ``teacher_head``: the
    head of ``teacher``'s rows when they come from another model (``tagi_ds.teacher_model``); default ``head``."""
    terms = tuple(columns)
    names = {t.name for t in on}
    flags = tuple(t.name in names for t in terms)
    n = student.shape[0]
    if n == 0:
        zero = student.sum() * 0.0
        return {t.name: zero for t, f in zip(terms, flags) if f}
    grad = torch.is_grad_enabled() and student.requires_grad
    chunk = lc.chunk_tokens
    sums = []
    for i in range(0, n, chunk):
        rows = slice(i, i + chunk)
        t_rows = teacher[rows] if teacher is not None else None
        args = (head, student[rows], labels[rows], t_rows, lc, terms, flags, teacher_head)
        sums.append(
            checkpoint(_chunk_sums, *args, use_reentrant=False, preserve_rng_state=False)
            if grad
            else _chunk_sums(*args)
        )
    total = torch.stack(sums).sum(0) / n
    return {t.name: total[i] for i, (t, f) in enumerate(zip(terms, flags)) if f}


def _delta_sq_dist(Ag, Bg, sg, At, Bt, st) -> torch.Tensor:
    """``||sg Bg Ag - st Bt At||_F^2`` per task, via r x r Gram matrices (the d_out x d_in delta never exists).

    ``||X - Y||^2 = ||X||^2 - 2<X, Y> + ||Y||^2`` with ``<B1 A1, B2 A2> = sum((B1^T B2) * (A1 A2^T))``.
    """

    def inner(A1, B1, A2, B2):
        return ((B1.transpose(1, 2) @ B2) * (A1 @ A2.transpose(1, 2))).sum((1, 2))

    d = sg * sg * inner(Ag, Bg, Ag, Bg) - 2 * sg * st * inner(Ag, Bg, At, Bt) + st * st * inner(At, Bt, At, Bt)
    return d.clamp(min=0.0)


def _delta_sq_norm(A, B, s) -> torch.Tensor:
    """``||s B A||_F^2`` per task via the r x r Gram matrices: ``s^2 sum((B^T B) * (A A^T))``."""
    return s * s * ((B.transpose(1, 2) @ B) * (A @ A.transpose(1, 2))).sum((1, 2))


ALIGN_MODES = ("relative", "delta", "factors")
# A task whose teacher delta is zero at every site (a bank row its teachers stage never sampled, still at B = 0)
# gives nothing to be relative to: it is left out of the mean (a 1/0 would otherwise be its gradient).
RELATIVE_FLOOR = 1e-12


def param_alignment(
    generated: dict[int, tuple[torch.Tensor, torch.Tensor]],
    gen_scale: float,
    teacher: dict[int, tuple[torch.Tensor, torch.Tensor]],
    teacher_scale: float,
    mode: str = "relative",
) -> torch.Tensor:
    """How far the generated adapters are from the teacher's, over the sites ``s`` and the batch's tasks.

    ``relative`` (the default): per task ``sum_s ||dG_s - dT_s||_F^2 / sum_s ||dT_s||_F^2`` with ``d = s B A``
    the effective deltas, then the mean over tasks (tasks whose teacher delta is 0 everywhere, an untrained
    bank row, are left out: 0 when none is left). Scale-free: 1.0 at init (the generated delta starts at 0)
    whatever the model width, rank or teacher scale, so its weight means the same at every size. The
    per-element MSE of ``delta`` divides by ``d_out * d_in`` instead and starts at ~1e-3 on the tiny model,
    where its gradient is ~1e-3 of CE's: an inert term.
    ``delta``: the mean over sites and tasks of the per-element MSE of the effective deltas ``s B A`` (any
    ranks; invariant to how a delta is factored).
    ``factors``: ``A`` with ``A`` and ``s B`` with ``s B`` (ranks must match).
    Deltas are never materialised (``d_out x d_in``): distances go through r x r Gram matrices.
    """
    if mode not in ALIGN_MODES:
        raise ValueError(f"loss.param_align must be one of {', '.join(ALIGN_MODES)}, got {mode!r}")
    terms, norms = [], []
    for site, (Ag, Bg) in generated.items():
        At, Bt = teacher[site]
        Ag, Bg, At, Bt = Ag.float(), Bg.float(), At.float(), Bt.float()
        if mode == "relative":
            terms.append(_delta_sq_dist(Ag, Bg, gen_scale, At, Bt, teacher_scale))
            norms.append(_delta_sq_norm(At, Bt, teacher_scale))
        elif mode == "delta":
            terms.append(_delta_sq_dist(Ag, Bg, gen_scale, At, Bt, teacher_scale) / (Bg.shape[1] * Ag.shape[2]))
        else:
            if Ag.shape != At.shape:
                raise ValueError(
                    f"loss.param_align=factors needs equal ranks: generated A {tuple(Ag.shape)} vs "
                    f"teacher A {tuple(At.shape)}; use param_align=relative or delta"
                )
            terms.append(((Ag - At) ** 2).mean((1, 2)) + ((gen_scale * Bg - teacher_scale * Bt) ** 2).mean((1, 2)))
    if mode == "relative":  # [S, K] -> per task over sites -> mean over the tasks that have a teacher delta
        num, den = torch.stack(terms).sum(0), torch.stack(norms).sum(0)
        has = den > RELATIVE_FLOOR  # torch.where, not indexing: no host sync
        ratio = torch.where(has, num / den.clamp(min=RELATIVE_FLOOR), torch.zeros_like(num))
        return ratio.sum() / has.sum().clamp(min=1)
    return torch.stack(terms).mean()
