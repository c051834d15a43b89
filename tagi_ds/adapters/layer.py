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

from tagi_ds.ops import lora_delta, lora_delta_add_, lora_linear_fused, resolve_impl, serves

# How an adapted layer computes base + delta: "unfused" (the base layer's own GEMM, then the delta added into its
# output in place) or "fused" (one Triton GEMM per direction with the LoRA inside it, tagi_ds.ops.lora_linear_fused).
# The default stays "unfused" until a GPU measurement shows the fused kernel beating it (kernels/NOTES.md, decision
# rule); "fused" runs only where an implementation that serves lora_linear_fused runs (impl resolves to triton, or
# another record of tagi_ds/op_impls.py that names one) and the base is an nn.Linear.
LINEAR_PATHS = ("unfused", "fused")


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
    examples are rows ``example_offsets[k]:example_offsets[k+1]`` (int64 ``[K+1]``) of the batch.
    ``host_offsets``: the same offsets as Python ints when the caller has them (``TaskBatch.offsets_list``)."""

    factors: dict[int, tuple[torch.Tensor, torch.Tensor]]
    example_offsets: torch.Tensor
    scale: float
    impl: str = "auto"
    host_offsets: list[int] | None = None
    linear: str = "unfused"

    def __post_init__(self) -> None:
        if self.linear not in LINEAR_PATHS:
            raise ValueError(f"AdapterSet: linear must be one of {', '.join(LINEAR_PATHS)}, got {self.linear!r}")
        # Validated once per forward here, so the adapted layers need no device sync; from the host copy when
        # given (reading example_offsets on a GPU would wait for the device).
        offs = list(self.host_offsets) if self.host_offsets is not None else self.example_offsets.tolist()
        if not offs or offs[0] != 0 or any(b < a for a, b in zip(offs, offs[1:])):
            raise ValueError(f"AdapterSet: example_offsets must start at 0 and be non-decreasing, got {offs}")
        if len(offs) != self.example_offsets.numel():
            raise ValueError(
                f"AdapterSet: host_offsets {offs} do not match example_offsets [{self.example_offsets.numel()}]"
            )
        self.num_examples = offs[-1]
        self._token_offsets: dict[int, torch.Tensor] = {}

    def token_offsets(self, seq: int) -> torch.Tensor:
        """int64 ``[K+1]`` token offsets of ``[B * seq, d]`` inputs: ``example_offsets * seq``, made once per length
        and forward (every adapted layer of a stack shares it) instead of once per layer."""
        offs = self._token_offsets.get(seq)
        if offs is None:
            offs = self._token_offsets[seq] = self.example_offsets * seq
        return offs


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
        adapters = self._state.active
        if (
            adapters is not None
            and adapters.linear == "fused"
            and self.site.index in adapters.factors
            and type(self.base_layer) is nn.Linear
            and (impl := resolve_impl(adapters.impl, x)) != "torch"
            and serves(impl, "lora_linear_fused")
        ):
            return self._fused(x, adapters, impl)
        # The base layer is called as a module: under a partitioned ZeRO-3 backbone its hooks gather the weight.
        y = self.base_layer(x)
        if adapters is None or self.site.index not in adapters.factors:
            return y
        A, B = adapters.factors[self.site.index]
        n_examples, seq = x.shape[0], x.shape[1]  # x: [B, L, d_in], examples grouped by task
        if adapters.num_examples != n_examples:
            raise ValueError(
                f"adapted layer {self.site.name}: batch has {n_examples} rows but the adapters "
                f"cover {adapters.num_examples} examples"
            )
        x2 = x.reshape(-1, x.shape[-1])
        A, B, offs = A.to(x2.dtype), B.to(x2.dtype), adapters.token_offsets(seq)
        if y.dtype == x2.dtype and y.is_contiguous():
            # The delta goes into the base output in place: no [T, d_out] delta tensor written and read back by
            # an add. Autograd allows it: the linear's backward does not need its output.
            lora_delta_add_(y.view(-1, y.shape[-1]), x2, A, B, offs, adapters.scale, adapters.impl, check_offsets=False)
            return y
        delta = lora_delta(x2, A, B, offs, adapters.scale, adapters.impl, check_offsets=False)
        return y + delta.view(y.shape).to(y.dtype)

    def _fused(self, x: torch.Tensor, adapters: AdapterSet, impl: str) -> torch.Tensor:
        """base + delta as one fused GEMM, run *as the base layer's forward*: ``base(x)`` goes through
        ``nn.Module.__call__``, so ZeRO-3's pre-forward hook has gathered ``base.weight`` when the kernel reads it,
        its post-forward hook releases it and hooks the output so that backward gathers it again before the dgrad
        GEMM reads the saved parameter (exactly what happens to F.linear's saved weight on the unfused path)."""
        base = self.base_layer
        A, B = adapters.factors[self.site.index]
        if adapters.num_examples != x.shape[0]:
            raise ValueError(
                f"adapted layer {self.site.name}: batch has {x.shape[0]} rows but the adapters "
                f"cover {adapters.num_examples} examples"
            )
        offs = adapters.token_offsets(x.shape[1])

        def fused_forward(inp: torch.Tensor) -> torch.Tensor:
            x2 = inp.reshape(-1, inp.shape[-1])
            w = base.weight  # gathered by now under ZeRO-3
            y2 = lora_linear_fused(
                x2,
                w.to(x2.dtype),
                None if base.bias is None else base.bias.to(x2.dtype),
                A.to(x2.dtype),
                B.to(x2.dtype),
                offs,
                adapters.scale,
                impl,
                check_offsets=False,
            )
            return y2.view(*inp.shape[:-1], y2.shape[-1])

        base.forward = fused_forward  # instance attribute: shadows nn.Linear.forward for this one call
        try:
            return base(x)
        finally:
            del base.forward

    def extra_repr(self) -> str:
        return f"site={self.site.index} ({self.site.stack}.{self.site.layer}.{self.site.kind})"
