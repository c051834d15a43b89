"""What a backbone module provides (:class:`Backbone`, and :class:`Fusing` / :class:`CrossCaching` where its family's
record says ``fusion`` / ``cross_cache``), and ``get(arch)``: the module that ``model.arch``'s record names.

``t5`` is the encoder-decoder; ``decoder`` serves every family that :func:`tagi_ds.families.decoder_family`
describes. Every module has the same signatures (tests/backbones/test_families.py compares them), so callers never
branch on the family: what differs is read from its record (``tagi_ds.families``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from tagi_ds import families

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tagi_ds.config import ModelConfig

    Head = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class Backbone(Protocol):
    """A backbone module's functions (a module satisfies a protocol: PEP 544); ``model`` is the HF model."""

    def build(self, cfg: ModelConfig, pad_id: int = 0, eos_id: int = 1, bos_id: int | None = 3) -> nn.Module:
        """Load ``cfg.model_name_or_path`` or random-init ``cfg``'s shape (``bos_id``: the family's, if it has one)."""

    def site_names(self, model: nn.Module, cfg: ModelConfig) -> list[tuple[str, str, int, str]]:
        """``(module_name, stack, layer, kind)`` of every adapted projection, in a fixed order."""

    def body(self, model: nn.Module) -> nn.Module:
        """The part that reads instructions (T5: the encoder; decoder-only: the stack without the LM head)."""

    def encode(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, first_last: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final states ``[K, L, d]`` of ``body`` and, if asked, the first layer's."""

    def logits(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
        cache: Callable | None = None,
    ) -> torch.Tensor:
        """Logits for ``labels`` (``prefix``/``cache``: fusion's, None for a family without it)."""

    def head_inputs(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
        cache: Callable | None = None,
    ) -> tuple[Any, Head]:
        """What the training loss projects and ``head`` (``head(x)`` equals ``logits`` at the same rows)."""


@runtime_checkable
class Fusing(Protocol):
    """A family with ``fusion``: its decoder reads ``[prefix ; hidden]``."""

    def fuse(
        self, hidden: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor | None, prefix_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[prefix ; hidden]`` states and ``[prefix_mask ; mask]`` (unchanged without a prefix)."""


@runtime_checkable
class CrossCaching(Protocol):
    """A family with ``cross_cache``: the decoder's cross-attention keys/values filled in before decoding."""

    def cross_cache(
        self,
        model: nn.Module,
        hidden: torch.Tensor,
        prefix: torch.Tensor,
        rows: torch.Tensor,
        prefix_scope: Callable[[], AbstractContextManager],
        prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> Any:
        """A cache over ``[prefix[rows] ; hidden]`` whose prefix part is projected once per task (or given,
        already projected: ``prefix_kv``, what :meth:`prefix_keys_values` returned, as the server caches it)."""

    def prefix_keys_values(
        self, model: nn.Module, prefix: torch.Tensor, prefix_scope: Callable[[], AbstractContextManager]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every decoder layer's cross-attention keys and values of ``prefix`` (each task's instruction states)."""


PROTOCOLS = ((Backbone, None), (Fusing, "fusion"), (CrossCaching, "cross_cache"))  # (protocol, the record's flag)


def members(protocol: type) -> list[str]:
    return [n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")]


def get(arch: str) -> Backbone:
    """The backbone module of ``model.arch``: its record's ``module``, checked to provide what the record says."""
    family = families.get(arch)
    module = importlib.import_module(family.module)
    for protocol, flag in PROTOCOLS:
        if (flag is None or getattr(family, flag)) and not isinstance(module, protocol):
            missing = [n for n in members(protocol) if not callable(getattr(module, n, None))]
            raise TypeError(
                f"{family.module} (model.arch={arch}) lacks {', '.join(missing)} of "
                f"tagi_ds.backbones.{protocol.__name__}"
            )
    return module
