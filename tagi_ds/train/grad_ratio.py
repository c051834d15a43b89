"""Is every loss term pushing? The gradient-norm ratio of each weighted term to CE's, on the trainable weights.

A term whose gradient is 1e-3 of CE's is a re-run with another seed, whatever its loss value says; its ablation
then measures nothing. Every ``train.grad_ratio_every`` steps (from step 0) the loop hands each micro-batch's
terms here, and the step's metrics.jsonl line gains, for each term k other than CE,

  ``grad_ratio/k = ||grad(w_k L_k)|| / ||grad(L_ce)||`` and ``grad_cos/k = cos(grad(w_k L_k), grad(L_ce))``

with ``w_k`` the term's weight in the loss (its ``tagi_ds.loss_terms`` record: ``loss.kl_weight``, ...), for every
registered term that is on. The gradients are the step's: summed over its micro-batches and averaged over ranks
(one all-reduce), so 2 ranks x 1 micro-batch give the ratios of 1 rank x 2. Cost: one extra backward per term and
micro-batch on those steps only (autograd.grad with the graph kept for the step's own backward); nothing on the
others.

ZeRO-3: the gradients are taken w.r.t. the trainable parameters held whole on every rank (the hypernetwork,
``runtime.engine.keep_whole``); autograd.grad fills no ``.grad`` and runs none of DeepSpeed's gradient hooks,
so the step's own backward and reduce-scatter are untouched. Trainable parameters ZeRO-3 partitions (a
partially trainable backbone) are left out: their full gradient exists only inside DeepSpeed's reduction.
"""

from __future__ import annotations

import torch

from tagi_ds.config import LossConfig
from tagi_ds.loss_terms import TERMS
from tagi_ds.runtime import dist


def weighted(terms: dict[str, torch.Tensor], lc: LossConfig) -> dict[str, torch.Tensor]:
    """The terms as they enter the loss (``model.TagiModel.forward``): each registered term times its weight."""
    return {k: TERMS[k].weight_of(lc) * v for k, v in terms.items() if k in TERMS}


def whole_trainable(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Trainable parameters whole on this rank: all without ZeRO-3, its persistent ones under it."""
    return [p for p in params if p.requires_grad and (not hasattr(p, "ds_id") or getattr(p, "ds_persist", False))]


def ratios(grads: dict[str, torch.Tensor]) -> dict[str, float]:
    """``grad_ratio/k`` and ``grad_cos/k`` of each term k against ``grads["ce"]`` (0 where CE's gradient is 0)."""
    ce = grads["ce"]
    n_ce = float(ce.norm())
    out: dict[str, float] = {}
    for k, g in grads.items():
        if k == "ce":
            continue
        n = float(g.norm())
        out[f"grad_ratio/{k}"] = n / n_ce if n_ce > 0 else 0.0
        out[f"grad_cos/{k}"] = float(g @ ce) / (n * n_ce) if n > 0 and n_ce > 0 else 0.0
    return out


def due(every: int, step: int) -> bool:
    """Measure at this optimizer step (0-based: step 0 is the first)?"""
    return every > 0 and step % every == 0


def through_backbone(name: str) -> bool:
    """A token term's gradient runs back through the backbone (CE, KL); an adapter term's (param: generator ->
    factors) does not. Under ZeRO-3 a backward through the (partitioned) backbone re-gathers and then releases its
    parameters, so the same graph cannot be walked twice: each token term gets a forward of its own; the adapter
    terms share the first forward's graph."""
    return TERMS[name].kind == "token"


class StepRatios:
    """The gradient ratios of one optimizer step: :meth:`add` each micro-batch, :meth:`result` once (a
    collective: every rank calls it, or none).

    Each micro-batch is run again, outside the engine's own forward and backward: one extra forward per
    backbone term (CE, KL) and one autograd.grad per term, under a forked RNG so that the step itself (dropout,
    sampling) is what it would have been without the measurement.
    """

    def __init__(self, model: torch.nn.Module, lc: LossConfig) -> None:
        self.model, self.lc = model, lc
        self.params = whole_trainable(list(model.parameters()))
        self.sums: dict[str, torch.Tensor] = {}

    def _grad(self, term: torch.Tensor, retain: bool) -> torch.Tensor:
        grads = torch.autograd.grad(term, self.params, retain_graph=retain, allow_unused=True)
        return torch.cat(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, self.params)]
        )

    def _accumulate(self, k: str, g: torch.Tensor) -> None:
        self.sums[k] = self.sums[k] + g if k in self.sums else g

    def add(self, batch) -> None:
        if not self.params:
            return
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            terms = weighted(self.model(batch)[1], self.lc)
            if len(terms) < 2:  # CE alone: nothing to compare
                return
            through = [k for k in terms if through_backbone(k)]
            for k in terms:
                if k not in through:
                    self._accumulate(k, self._grad(terms[k], retain=True))
            for i, k in enumerate(through):
                if i:
                    terms = weighted(self.model(batch)[1], self.lc)
                self._accumulate(k, self._grad(terms[k], retain=False))

    def result(self) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        flat = torch.stack([self.sums[k] for k in keys])  # [T, P]: one all-reduce for every term
        if torch.distributed.is_initialized() and dist.world_size() > 1:
            torch.distributed.all_reduce(flat)
            flat /= dist.world_size()
        return ratios(dict(zip(keys, flat.cpu())))
