"""Instruction encoding: the backbone's own encoder (T5) or body (LLaMA), adapters off, masked-mean pooled.

Each unique instruction of a batch is encoded once (the batch carries one instruction per task). The
frozen backbone needs no gradient here, so by default this runs without an autograd graph at all; when
parameters on this path are trainable (``model.trainable``), it runs under non-reentrant activation
checkpointing if ``hypernet.checkpoint_encoder`` is on.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tagi_ds.adapters.layer import AdapterState
from tagi_ds.backbones.base import masked_mean


class InstructionEncoder:
    """Not an ``nn.Module``: it only borrows the backbone, which the model already owns."""

    def __init__(
        self, backbone: nn.Module, arch: ModuleType, state: AdapterState, pooling: str, use_checkpoint: bool
    ) -> None:
        self.backbone, self.arch, self.state = backbone, arch, state
        self.first_last = pooling == "first_last"
        self.use_checkpoint = use_checkpoint
        self._params = list(arch.body(backbone).parameters())

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        last, first = self.arch.encode(self.backbone, ids, mask, first_last=self.first_last)
        pooled = masked_mean(last, mask)
        if first is not None:
            pooled = 0.5 * (pooled + masked_mean(first, mask))
        return last, pooled

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[K, Li]`` ids and mask -> (states ``[K, Li, d]``, pooled ``[K, d]``)."""
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self._params)
        with self.state.use(None):
            if not needs_grad:
                with torch.no_grad():
                    return self._encode(ids, mask)
            if self.use_checkpoint:
                return checkpoint(
                    self._encode, ids, mask, use_reentrant=False, context_fn=self.state.checkpoint_context
                )
            return self._encode(ids, mask)
