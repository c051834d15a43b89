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
    B zero, so every row starts as a zero delta) and scale ``alpha / r``.

    ``init="empty"`` allocates the factors without initialising them (undefined values): for a bank whose values
    are loaded afterwards or do not matter (benchmark timing); drawing a 1B-value bank costs ~20 s of host time.
    """

    INITS = ("peft", "empty")

    def __init__(self, sites: list[Site], num_rows: int, rank: int, alpha: float, init: str = "peft") -> None:
        super().__init__()
        if init not in self.INITS:
            raise ValueError(f"LoraBank: init must be one of {', '.join(self.INITS)}, got {init!r}")
        self.num_rows, self.rank, self.alpha = num_rows, rank, alpha
        self.scale = alpha / rank
        self.site_indices = [s.index for s in sites]
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        self._staging: torch.Tensor | None = None  # see ``keep``: the one pinned buffer ``take`` copies from
        self._staged: torch.cuda.Event | None = None
        for s in sites:
            a = torch.empty(num_rows, rank, s.d_in)
            b = torch.empty(num_rows, s.d_out, rank)
            if init == "peft":
                bound = 1.0 / math.sqrt(s.d_in)  # = kaiming_uniform_(a=sqrt(5)) on an [r, d_in] weight, as peft does
                nn.init.uniform_(a, -bound, bound)
                b.zero_()
            self.A[str(s.index)] = nn.Parameter(a)
            self.B[str(s.index)] = nn.Parameter(b)

    def forward(
        self, rows: torch.Tensor, host_rows: list[int] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(A [K, r, d_in], B [K, d_out, r])]`` in ``site_indices`` order, for bank rows ``rows`` (int64
        ``[K]``; ``host_rows``: the same as Python ints, checked instead of reading ``rows`` back from the device).
        Called as a module (and returning plain tensors) so that ZeRO-3 gathers the factors."""
        self._check_rows(rows.tolist() if host_rows is None else host_rows)
        return [(self.A[str(i)][rows], self.B[str(i)][rows]) for i in self.site_indices]

    def _check_rows(self, rows: list[int]) -> None:
        if rows and (min(rows) < 0 or max(rows) >= self.num_rows):
            raise ValueError(f"LoraBank: rows must be in [0, {self.num_rows}), got {rows}")

    def adapters(
        self,
        rows: torch.Tensor,
        example_offsets: torch.Tensor,
        impl: str = "auto",
        host_rows: list[int] | None = None,
        host_offsets: list[int] | None = None,
    ) -> AdapterSet:
        """The AdapterSet of rows ``rows`` for tasks at ``example_offsets``; ``host_rows`` and ``host_offsets``: the
        same as Python ints, when the caller has them (no device reads)."""
        factors = dict(zip(self.site_indices, call_whole(self, rows, host_rows)))
        return AdapterSet(
            factors=factors, example_offsets=example_offsets, scale=self.scale, impl=impl, host_offsets=host_offsets
        )

    # -- host-resident use (the frozen distillation teacher) ---------------------------------------------
    def keep(self, dtype: torch.dtype, device: torch.device, max_rows: int, staged: bool | None = None) -> LoraBank:
        """Keep this frozen bank in ``dtype`` (the training dtype, so a step casts nothing) on ``device``; when
        ``device`` is the host while the steps run on CUDA (``staged``: that, unless given), in host memory with ONE
        staging buffer that ``take`` fills with up to ``max_rows`` rows per site (``index_select(..., out=)``) and
        copies to the step's device in one non-blocking copy. The buffer is page-locked when CUDA is present: a
        non-blocking copy from pageable memory (a fresh ``index_select`` result) is a synchronous one, and pinning
        the bank itself does not help a copy that reads from another tensor."""
        with torch.no_grad():
            for p in self.parameters():
                p.data = p.data.to(device, dtype)
        if staged is None:
            staged = device.type == "cpu" and torch.cuda.is_available()
        self._staged = None
        self._staging = (
            torch.empty(max_rows * self._row_numel(), dtype=dtype, device="cpu", pin_memory=torch.cuda.is_available())
            if staged and device.type == "cpu"
            else None
        )
        return self

    def _row_numel(self) -> int:
        return sum(a[0].numel() + b[0].numel() for a, b in zip(self.A.values(), self.B.values()))

    def take(
        self,
        rows: list[int] | torch.Tensor,
        example_offsets: torch.Tensor,
        device: torch.device,
        dtype: torch.dtype,
        impl: str = "auto",
        host_offsets: list[int] | None = None,
    ) -> AdapterSet:
        """An AdapterSet of rows ``rows`` (Python ints, or a tensor) of a bank kept whole outside DeepSpeed (on
        the device or in host memory, ``keep``): only these rows (``[K, r, d_in]`` and ``[K, d_out, r]`` per site)
        are copied to ``device`` in ``dtype``. The stage-2 teacher is used this way: it is frozen, so ZeRO-3 would
        only all-gather the whole bank at every step to read the K rows of the batch's tasks."""
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        self._check_rows(rows)
        home = self.A[str(self.site_indices[0])].device if self.site_indices else torch.device("cpu")
        with torch.no_grad():
            if self._staging is not None and home.type == "cpu" and self._fits(len(rows)):
                factors = self._take_staged(rows, device, dtype)
            else:
                idx = torch.tensor(rows, dtype=torch.long, device=home)
                factors = {
                    i: (
                        self.A[str(i)].index_select(0, idx).to(device, dtype, non_blocking=True),
                        self.B[str(i)].index_select(0, idx).to(device, dtype, non_blocking=True),
                    )
                    for i in self.site_indices
                }
        return AdapterSet(
            factors=factors, example_offsets=example_offsets, scale=self.scale, impl=impl, host_offsets=host_offsets
        )

    def _fits(self, k: int) -> bool:
        return k * self._row_numel() <= self._staging.numel()

    def _take_staged(
        self, rows: list[int], device: torch.device, dtype: torch.dtype
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The rows gathered into the staging buffer (site after site, A then B), one copy of the used part to
        ``device``, and views of that copy per factor."""
        if self._staged is not None:
            self._staged.synchronize()  # the previous step's copy may still read the buffer we are about to fill
        k, idx, views, at = len(rows), torch.tensor(rows, dtype=torch.long, device="cpu"), [], 0
        for i in self.site_indices:
            for factor in (self.A[str(i)], self.B[str(i)]):
                shape = (k, *factor.shape[1:])
                n = math.prod(shape)
                torch.index_select(factor, 0, idx, out=self._staging[at : at + n].view(shape))
                views.append((at, shape))
                at += n
        # Into a new tensor even on the host: the next step refills the buffer while this step's views may live on.
        moved = torch.empty(at, device=device, dtype=dtype).copy_(self._staging[:at], non_blocking=True)
        if moved.is_cuda and torch.cuda.is_available():  # (a fake CUDA tensor, in the tests, has no stream)
            self._staged = torch.cuda.Event()
            self._staged.record()
        out = [moved[a : a + math.prod(shape)].view(shape) for a, shape in views]
        return {i: (out[2 * j], out[2 * j + 1]) for j, i in enumerate(self.site_indices)}
