"""tagi_kernels: Triton kernels of tagi-ds (the folder kernels/, imported under this name).

``triton_lora_delta(x, A, B, seg_offsets, scale)`` is the per-task LoRA delta behind
``tagi_ds.ops.lora_delta(impl="triton")`` (``tagi_ds.ops.lora_delta_torch`` is its reference);
``triton_lora_delta_add_`` adds the delta into a given output in place and ``triton_lora_linear`` is the whole
adapted linear (base GEMM + delta), behind ``tagi_ds.ops.lora_delta_add_`` / ``tagi_ds.ops.lora_linear``.
``triton_lora_linear_fused`` is the adapted linear as one Triton GEMM per direction with the LoRA inside it
(``tagi_ds.ops.lora_linear_fused``; reference ``tagi_ds.ops.lora_linear_torch``).
Import after setting TRITON_INTERPRET=1 to run the kernels on CPU tensors; ``TAGI_KERNELS_TUNE=fixed`` (read at
import) replaces the autotune spaces by one config per kernel (the GPU test stage's short compile). Design and
measurements: kernels/NOTES.md.
"""

from .fused_linear import LoraLinearFusedFunction, triton_lora_linear_fused
from .lora_delta import (
    LoraDeltaAddFunction,
    LoraDeltaFunction,
    LoraLinearFunction,
    triton_lora_delta,
    triton_lora_delta_add_,
    triton_lora_linear,
)

__all__ = [
    "LoraDeltaAddFunction",
    "LoraDeltaFunction",
    "LoraLinearFunction",
    "LoraLinearFusedFunction",
    "triton_lora_delta",
    "triton_lora_delta_add_",
    "triton_lora_linear",
    "triton_lora_linear_fused",
]
