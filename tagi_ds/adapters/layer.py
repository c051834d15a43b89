"""The adapted Linear: a frozen ``base_layer`` plus per-task low-rank deltas, by composition.

The adapters of one forward travel in an explicit :class:`AdapterSet`; the model installs it on the
:class:`AdapterState` that all of its adapted layers share (``with state.use(adapters): ...``). No globals.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from tagi_ds.ops import lora_delta


@dataclass(frozen=True)
class Site:
    """One adapted projection. ``index`` keys the factors; ``stack/layer/kind`` name it for humans."""

    index: int
    name: str  # module path in the backbone, e.g. encoder.block.0.layer.0.SelfAttention.q
    stack: str  # encoder | decoder | cross
    layer: int
    kind: str  # q k v o wi wo ... (T5) / q k v o gate up down (LLaMA)
    d_in: int
    d_out: int


@dataclass
class AdapterSet:
    """Factors for one forward. ``factors[site] = (A [K, r, d_in], B [K, d_out, r])`` for K tasks whose
    examples are rows ``example_offsets[k]:example_offsets[k+1]`` (int64 ``[K+1]``) of the batch."""

    factors: dict[int, tuple[torch.Tensor, torch.Tensor]]
    example_offsets: torch.Tensor
    scale: float
    impl: str = "auto"

    def __post_init__(self) -> None:
        # Validated once per forward here (host reads), so the adapted layers need no device sync.
        offs = self.example_offsets.tolist()
        if not offs or offs[0] != 0 or any(b < a for a, b in zip(offs, offs[1:])):
            raise ValueError(f"AdapterSet: example_offsets must start at 0 and be non-decreasing, got {offs}")
        self.num_examples = offs[-1]

class AdapterState:
    """The slot through which a model hands the current :class:`AdapterSet` to its adapted layers."""

    def __init__(self) -> None:
        self.active: AdapterSet | None = None

    @contextmanager
    def use(self, adapters: AdapterSet | None) -> Iterator[None]:
        previous, self.active = self.active, adapters
        try:
            yield
        finally:
            self.active = previous

    def checkpoint_context(self):
        """``context_fn`` for non-reentrant ``torch.utils.checkpoint``: the recomputation in backward
        runs after ``use`` has exited, so it must see the adapters that were active in forward."""
        captured = self.active
        return nullcontext(), self.use(captured)


class AdaptedLinear(nn.Module):
    """``y = base_layer(x) + scale * B_t (A_t x)`` for the task t of each example; base untouched.

    Under ZeRO-3 ``base_layer`` is the partitioned module: DeepSpeed's hooks gather its weight when it
    is called, and this wrapper owns no parameters of its own.
    """

    def __init__(self, base_layer: nn.Linear, site: Site, state: AdapterState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.site = site
        self._state = state  # plain attribute: shared, not a submodule

    @property
    def weight(self) -> torch.Tensor:
        # HF code reads a wrapped Linear's weight (T5's FFN checks wo.weight.dtype); forward it, as peft does.
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        adapters = self._state.active
        if adapters is None or self.site.index not in adapters.factors:
            return y
        A, B = adapters.factors[self.site.index]
        n_examples, seq = x.shape[0], x.shape[1]  # x: [B, L, d_in], examples grouped by task
        if adapters.num_examples != n_examples:
            raise ValueError(f"adapted layer {self.site.name}: batch has {n_examples} rows but the adapters "
                             f"cover {adapters.num_examples} examples")
        x2 = x.reshape(-1, x.shape[-1])
        delta = lora_delta(x2, A.to(x2.dtype), B.to(x2.dtype), adapters.example_offsets * seq,
                           adapters.scale, adapters.impl, check_offsets=False)
        return y + delta.view(y.shape).to(y.dtype)

    def extra_repr(self) -> str:
        return f"site={self.site.index} ({self.site.stack}.{self.site.layer}.{self.site.kind})"
