"""The stage objective's terms as registered records: what the loss (``model.TagiModel.forward``), the log
(metrics.jsonl, ``train/grad_ratio.py``) and the planner (``tagi_ds.plan``) read, instead of naming CE, KL and
parameter alignment each in its own way.

A term is one :class:`LossTerm`: its name (the key of ``forward``'s terms dict, of its metrics.jsonl column and of
``grad_ratio/<name>``), the ``LossConfig`` field that holds its weight (``loss.kl_weight``; a plugin may give a
constant instead), its kind, what it reads, its function and its planner :class:`Cost`.

- ``token``: computed inside the chunked LM-head loop (``losses.token_sums``), one chunk of target rows at a
  time: ``fn(student_logits, labels, teacher_logits, lc)`` returns the chunk's *sum* (the loop divides by the N
  target tokens). Logits are fp32 ``[n, V]``; ``teacher_logits`` is the teacher view's (no gradient), None unless
  the term reads it (``teacher_view``).
- ``adapter``: computed once per step from the batch's student adapters and, with ``teacher_adapters``, the
  teacher bank's rows: ``fn(student, teacher, lc)`` on two ``AdapterSet`` (``teacher`` None when not read).

A term is on when its weight is > 0 and what it reads exists: a term that reads the teacher (its view or its
adapters) only in a run that distils (``stages.Spec.teacher``: finetune, mode tagi). The loss adds the terms that
are on in registry order, ``w * term``, CE first (weight 1), so the built-in order (CE, KL, alignment) gives the
same additions as before the registry.

Torch-free (config, stages and the planner's inputs read it without importing torch); the math is in
``losses.py``, which each built-in term's function calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["token", "adapter"]


@dataclass(frozen=True)
class Cost:
    """What a term adds to one training step, for the planner (``tagi_ds.plan``): functions of the planner's
    ``Counts`` ``c`` and ``Shapes`` ``s`` (and ``b``, bytes per element of the weight dtype).

    ``chunk``: fp32 ``[chunk, V]`` temporaries a token term keeps alive in one chunk's forward and recomputed
    backward, ``((fwd, bwd) decoder-only, (fwd, bwd) encoder-decoder)`` (T5's rows are logits already; measured
    with ``plan.measure.TensorBytesTracker``). ``flops``: its FLOPs per micro-batch step, forward and backward
    (matmul-like work only, as the planner counts the rest). ``saved``: bytes autograd keeps for its backward."""

    chunk: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    flops: Callable[[Any, Any], float] | None = None
    saved: Callable[[Any, Any, int], int] | None = None


@dataclass(frozen=True)
class LossTerm:
    name: str
    weight: str | float  # a LossConfig field (``--set loss.<field>``, README's table) or a constant weight
    kind: Kind
    fn: Callable[..., Any]
    teacher_view: bool = False  # token: reads the teacher view's logits (instruction + input, the teacher's adapters)
    teacher_adapters: bool = False  # reads the batch's teacher-bank rows (the alignment targets)
    cost: Cost = field(default_factory=Cost)

    @property
    def teacher(self) -> bool:
        """It reads the frozen teacher bank: on only in a run that distils."""
        return self.teacher_view or self.teacher_adapters

    def weight_of(self, lc) -> float:
        return float(getattr(lc, self.weight)) if isinstance(self.weight, str) else float(self.weight)

    def weight_label(self) -> str:
        """How errors name its weight: ``loss.kl_weight``, or the constant."""
        return f"loss.{self.weight}" if isinstance(self.weight, str) else f"{self.name}'s weight {self.weight}"


TERMS: dict[str, LossTerm] = {}


def register(term: LossTerm) -> LossTerm:
    """Add ``term`` after the others (the loss adds terms in this order). Its weight field must exist."""
    if term.name in TERMS:
        raise ValueError(f"loss term {term.name!r} is registered already")
    if term.kind not in ("token", "adapter"):
        raise ValueError(f"loss term {term.name!r}: kind must be token or adapter, got {term.kind!r}")
    if term.teacher_view and term.kind != "token":
        raise ValueError(f"loss term {term.name!r}: only a token term reads the teacher view's logits")
    if isinstance(term.weight, str):
        from tagi_ds.config import LossConfig

        if not hasattr(LossConfig, term.weight):
            raise ValueError(f"loss term {term.name!r}: LossConfig has no weight field {term.weight!r}")
    elif not term.weight >= 0:  # a weight field's range is LossConfig.RULES'
        raise ValueError(f"loss term {term.name!r}: a constant weight must be >= 0, got {term.weight!r}")
    TERMS[term.name] = term
    return term


@contextmanager
def registered(term: LossTerm) -> Iterator[LossTerm]:
    """``term`` registered for the ``with`` block only (tests)."""
    register(term)
    try:
        yield term
    finally:
        TERMS.pop(term.name, None)


def active(lc, teacher: bool) -> list[LossTerm]:
    """The terms on in a run with loss config ``lc``: weight > 0, and ``teacher`` (the run distils) for a term
    that reads the teacher bank. In registry order."""
    return [t for t in TERMS.values() if t.weight_of(lc) > 0 and (teacher or not t.teacher)]


def wants_teacher(lc) -> bool:
    """Some term that reads the teacher bank has a weight > 0: a finetune run in mode tagi then distils."""
    return any(t.teacher and t.weight_of(lc) > 0 for t in TERMS.values())


def wants_teacher_view(lc) -> bool:
    """Some term that reads the teacher view's logits has a weight > 0: task batches then carry that view."""
    return any(t.teacher_view and t.weight_of(lc) > 0 for t in TERMS.values())


def token_terms() -> tuple[LossTerm, ...]:
    """Every registered token term, in order: the columns of ``losses.token_sums``."""
    return tuple(t for t in TERMS.values() if t.kind == "token")


def token_losses(head, student, labels, teacher=None, temperature: float = 1.0, chunk: int = 256):
    """``(mean CE, mean KL or None)`` of ``head``'s logits at the rows ``student`` (``teacher``: the teacher view's
    rows, or None), ``chunk`` rows at a time: ``losses.token_sums`` of the ``ce`` and ``kl`` terms alone, as
    training computes them (benchmarks; tested against ``losses.ce_loss`` / ``kl_loss``)."""
    from tagi_ds.config import LossConfig
    from tagi_ds.losses import token_sums

    lc = LossConfig(temperature=temperature, chunk_tokens=chunk)
    on = [TERMS["ce"], *([TERMS["kl"]] if teacher is not None else [])]
    out = token_sums(head, student, labels, teacher, lc, token_terms(), on)
    return out["ce"], out.get("kl")


def teacher_weights() -> str:
    """The weights that make a run distil, for messages: ``loss.kl_weight or loss.param_weight``."""
    return " or ".join(t.weight_label() for t in TERMS.values() if t.teacher)


# -- the built-in terms (their math: tagi_ds/losses.py) ------------------------------------------------------
def _ce(student, labels, teacher, lc):
    from tagi_ds.losses import ce_sum

    return ce_sum(student, labels)


def _kl(student, labels, teacher, lc):
    from tagi_ds.losses import kl_sum

    return kl_sum(student, teacher, lc.temperature)


def _param(student, teacher, lc):
    from tagi_ds.losses import param_alignment

    return param_alignment(student.factors, student.scale, teacher.factors, teacher.scale, lc.param_align)


def _param_flops(c, s) -> float:
    """r x r Gram matrices per site and task (``losses._delta_sq_dist``), forward + backward."""
    return 3 * sum(2 * s.tasks * c.rank * c.teacher_rank * (di + do) * 3 for _, _, _, di, do in c.sites)


def _param_saved(c, s, b: int) -> int:
    """It saves the teacher's factors of the batch's tasks."""
    return sum(s.tasks * c.teacher_rank * (di + do) * b for _, _, _, di, do in c.sites)


# CE: the head's logits (decoder-only) and CE's log-softmax, and their gradients in backward. KL adds the teacher's
# logits, probabilities and log-probabilities and the student's tempered log-softmax.
register(LossTerm("ce", 1.0, "token", _ce, cost=Cost(chunk=((2, 3), (1, 2)))))
register(LossTerm("kl", "kl_weight", "token", _kl, teacher_view=True, cost=Cost(chunk=((3, 3), (3, 2)))))
register(
    LossTerm(
        "param",
        "param_weight",
        "adapter",
        _param,
        teacher_adapters=True,
        cost=Cost(flops=_param_flops, saved=_param_saved),
    )
)
