"""Stage objectives: CE over label tokens, KL_T(teacher || student), and parameter alignment.

Both official-code bugs are avoided (TAGI.md): the KL compares the real teacher distribution (never the
student's logits standing in for it), and parameter alignment compares like with like, in one scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def target_logits(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels at real target positions: ``([N, V], [N])`` in example-major token order.

    T5: ``logits[b, t]`` predicts ``labels[b, t]``. Decoder-only: ``logits[b, t]`` predicts ``labels[b, t+1]``.
    Teacher and student views of the same examples give the same N tokens in the same order.
    """
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    return logits[keep], labels[keep]


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over ``[N, V]`` / ``[N]`` target tokens (float32 softmax)."""
    return F.cross_entropy(logits.float(), labels)


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * mean_tokens KL(softmax(teacher/T) || softmax(student/T))`` over ``[N, V]`` target tokens."""
    if student.shape != teacher.shape:
        raise ValueError(f"kl_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} target "
                         "tokens differ: both views must carry the same labels")
    t = temperature
    log_p_t = F.log_softmax(teacher.float() / t, dim=-1)
    log_p_s = F.log_softmax(student.float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return kl.mean() * t * t if kl.numel() else student.sum() * 0.0


def _delta_sq_dist(Ag, Bg, sg, At, Bt, st) -> torch.Tensor:
    """``||sg Bg Ag - st Bt At||_F^2`` per task, via r x r Gram matrices (the d_out x d_in delta never exists).

    ``||X - Y||^2 = ||X||^2 - 2<X, Y> + ||Y||^2`` with ``<B1 A1, B2 A2> = sum((B1^T B2) * (A1 A2^T))``.
    """
    def inner(A1, B1, A2, B2):
        return ((B1.transpose(1, 2) @ B2) * (A1 @ A2.transpose(1, 2))).sum((1, 2))

    d = sg * sg * inner(Ag, Bg, Ag, Bg) - 2 * sg * st * inner(Ag, Bg, At, Bt) + st * st * inner(At, Bt, At, Bt)
    return d.clamp(min=0.0)


def param_alignment(generated: dict[int, tuple[torch.Tensor, torch.Tensor]], gen_scale: float,
                    teacher: dict[int, tuple[torch.Tensor, torch.Tensor]], teacher_scale: float,
                    mode: str = "delta") -> torch.Tensor:
    """Mean over sites and tasks of the MSE between generated and teacher adapters.

    ``delta``: between effective deltas ``s B A`` (any ranks; invariant to how a delta is factored).
    ``factors``: ``A`` with ``A`` and ``s B`` with ``s B`` (ranks must match).
    """
    terms = []
    for site, (Ag, Bg) in generated.items():
        At, Bt = teacher[site]
        Ag, Bg, At, Bt = Ag.float(), Bg.float(), At.float(), Bt.float()
        if mode == "delta":
            terms.append(_delta_sq_dist(Ag, Bg, gen_scale, At, Bt, teacher_scale) / (Bg.shape[1] * Ag.shape[2]))
        elif mode == "factors":
            if Ag.shape != At.shape:
                raise ValueError(f"loss.param_align=factors needs equal ranks: generated A {tuple(Ag.shape)} vs "
                                 f"teacher A {tuple(At.shape)}; use param_align=delta")
            terms.append(((Ag - At) ** 2).mean((1, 2)) + ((gen_scale * Bg - teacher_scale * Bt) ** 2).mean((1, 2)))
        else:
            raise ValueError(f"loss.param_align must be delta or factors, got {mode!r}")
    return torch.stack(terms).mean()
