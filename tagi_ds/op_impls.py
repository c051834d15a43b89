"""The adapter op's implementations besides the torch reference, as records (pure data: no torch, no import of
the kernels until an op runs).

``tagi_ds/ops.py`` holds the op's contract and its torch reference (the specification); an implementation is a
module whose functions take the public op's arguments (less ``impl`` and ``check_offsets``) plus ``checked=True``
(the arguments were validated) and return what the reference returns, differentiably. This record says which
module, which function serves each op, and whether ``model.adapter_impl=auto`` picks it. ``model.adapter_impl``
accepts ``auto``, ``torch`` and every registered name (``config.registered``: read when the config is checked).

The Triton kernels of ``kernels/tagi_kernels`` are the one implementation registered here. A new one is one record
(:func:`register`; :func:`registered` for a test's) and its module; ``tests/kernels/test_new_impl.py`` adds a
Triton kernel that way from the test file alone and trains through it on the tiny backbone.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

OPS = ("lora_delta", "lora_delta_add_", "lora_linear", "lora_linear_fused")  # the ops an implementation may serve
REQUIRED = ("lora_delta", "lora_delta_add_", "lora_linear")  # lora_linear_fused is optional (the layer asks)


@dataclass(frozen=True)
class OpImpl:
    """One implementation of the adapter op (``model.adapter_impl=<name>``)."""

    name: str
    module: str  # imported on first use; a failed import is named by the error (or auto's one warning)
    functions: Mapping[str, str]  # op (one of OPS) -> the module's function that serves it
    auto: Literal["cuda", "never"] = "never"  # cuda: impl=auto picks it for CUDA tensors when its module imports
    needs: str = ""  # what the import needs, for the error ("triton and the tagi_kernels package")

    def __post_init__(self) -> None:
        if self.name in ("auto", "torch"):
            raise ValueError(f"op impl {self.name!r}: auto and torch are not implementations to register")
        if unknown := sorted(set(self.functions) - set(OPS)):
            raise ValueError(f"op impl {self.name}: unknown ops {unknown} (the ops: {', '.join(OPS)})")
        if missing := [op for op in REQUIRED if op not in self.functions]:
            raise ValueError(f"op impl {self.name}: must serve {', '.join(missing)}")

    def serves(self, op: str) -> bool:
        return op in self.functions


IMPLS: dict[str, OpImpl] = {}


def register(impl: OpImpl) -> OpImpl:
    if impl.name in IMPLS:
        raise ValueError(f"op impl {impl.name!r} is registered already")
    IMPLS[impl.name] = impl
    return impl


@contextmanager
def registered(impl: OpImpl) -> Iterator[OpImpl]:
    """``impl`` registered for the duration of the block (a test's implementation leaves the registry as it was)."""
    register(impl)
    try:
        yield impl
    finally:
        del IMPLS[impl.name]


def names() -> tuple[str, ...]:
    """What ``model.adapter_impl`` accepts: auto, torch (the reference), then each registered implementation."""
    return ("auto", "torch", *IMPLS)


def get(name: str) -> OpImpl:
    return IMPLS[name]


register(
    OpImpl(
        "triton",
        "tagi_kernels",
        {
            "lora_delta": "triton_lora_delta",
            "lora_delta_add_": "triton_lora_delta_add_",
            "lora_linear": "triton_lora_linear",
            "lora_linear_fused": "triton_lora_linear_fused",
        },
        auto="cuda",
        needs="triton and the tagi_kernels package",
    )
)
