"""A bank of stacked LoRA factors: one row per task (or category), applied through the adapter op.

It is the stage-0 teachers (every teacher trained in one job), the stage-2 distillation teacher on the
same frozen backbone, and, with a single row, the shared LoRA of the concat / no-instruction baselines.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tagi_ds.adapters.layer import AdapterSet, Site


def call_whole(module: nn.Module, *args):
    """``module(*args)``, or its forward directly when ZeRO-3 keeps every parameter of ``module`` whole on every rank
    (``ds_persist``: the hypernetwork and the baselines' shared LoRA, ``tagi_ds.runtime.engine.kept_whole``). The hooks
    of a call would only gather parameters that are already there, and wrap each output tensor (two per adapted
    site) in an autograd function for the backward; the parameters' gradient hooks do not depend on them."""
    params = list(module.parameters())
    if params and all(getattr(p, "ds_persist", False) for p in params):
        return module.forward(*args)
    return module(*args)


class LoraBank(nn.Module):
    """Factors ``A[site]: [N, r, d_in]`` and ``B[site]: [N, d_out, r]`` with peft's init (A Kaiming-uniform,
    B zero, so every row starts as a zero delta) and scale ``alpha / r``."""

    def __init__(self, sites: list[Site], num_rows: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.num_rows, self.rank, self.alpha = num_rows, rank, alpha
        self.scale = alpha / rank
        self.site_indices = [s.index for s in sites]
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for s in sites:
            a = torch.empty(num_rows, rank, s.d_in)
            bound = 1.0 / math.sqrt(s.d_in)  # = kaiming_uniform_(a=sqrt(5)) on an [r, d_in] weight, as peft does
            nn.init.uniform_(a, -bound, bound)
            self.A[str(s.index)] = nn.Parameter(a)
            self.B[str(s.index)] = nn.Parameter(torch.zeros(num_rows, s.d_out, rank))

    def forward(self, rows: torch.Tensor,
                host_rows: list[int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(A [K, r, d_in], B [K, d_out, r])]`` in ``site_indices`` order, for bank rows ``rows`` (int64
        ``[K]``; ``host_rows``: the same as Python ints, checked instead of reading ``rows`` back from the device).
        Called as a module (and returning plain tensors) so that ZeRO-3 gathers the factors."""
        self._check_rows(rows.tolist() if host_rows is None else host_rows)
        return [(self.A[str(i)][rows], self.B[str(i)][rows]) for i in self.site_indices]

    def _check_rows(self, rows: list[int]) -> None:
        if rows and (min(rows) < 0 or max(rows) >= self.num_rows):
            raise ValueError(f"LoraBank: rows must be in [0, {self.num_rows}), got {rows}")

    def adapters(self, rows: torch.Tensor, example_offsets: torch.Tensor, impl: str = "auto",
                 host_rows: list[int] | None = None, host_offsets: list[int] | None = None) -> AdapterSet:
        """The AdapterSet of rows ``rows`` for tasks at ``example_offsets``; ``host_rows`` and ``host_offsets``: the
        same as Python ints, when the caller has them (no device reads)."""
        factors = dict(zip(self.site_indices, call_whole(self, rows, host_rows)))
        return AdapterSet(factors=factors, example_offsets=example_offsets, scale=self.scale, impl=impl,
                          host_offsets=host_offsets)

    # -- host-resident use (the frozen distillation teacher) ---------------------------------------------
    def pin(self) -> LoraBank:
        """Page-lock the factors when CUDA is present, so the per-step row copies are plain DMA."""
        if torch.cuda.is_available():
            for p in self.parameters():
                if p.device.type == "cpu" and not p.is_pinned():
                    p.data = p.data.pin_memory()
        return self

    def take(self, rows: list[int] | torch.Tensor, example_offsets: torch.Tensor, device: torch.device,
             dtype: torch.dtype, impl: str = "auto", host_offsets: list[int] | None = None) -> AdapterSet:
        """An AdapterSet of rows ``rows`` (Python ints, or a tensor) of a bank kept whole in host memory, outside
        DeepSpeed: only these rows (``[K, r, d_in]`` and ``[K, d_out, r]`` per site) are copied to ``device`` in
        ``dtype``. The stage-2 teacher is used this way: it is frozen, so ZeRO-3 would only all-gather the whole bank
        at every step to read the K rows of the batch's tasks."""
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        self._check_rows(rows)
        host = self.A[str(self.site_indices[0])].device if self.site_indices else torch.device("cpu")
        idx = torch.tensor(rows, dtype=torch.long, device=host)
        with torch.no_grad():
            factors = {i: (self.A[str(i)].index_select(0, idx).to(device, dtype, non_blocking=True),
                           self.B[str(i)].index_select(0, idx).to(device, dtype, non_blocking=True))
                       for i in self.site_indices}
        return AdapterSet(factors=factors, example_offsets=example_offsets, scale=self.scale, impl=impl,
                          host_offsets=host_offsets)
