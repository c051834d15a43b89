"""tagi_kernels: Triton kernels of tagi-ds (the folder kernels/, imported under this name).

``triton_lora_delta(x, A, B, seg_offsets, scale)`` is the fused per-task LoRA delta behind
``tagi_ds.ops.lora_delta(impl="triton")``; ``tagi_ds.ops.lora_delta_torch`` is its reference.
Import after setting TRITON_INTERPRET=1 to run the kernels on CPU tensors.
"""

from .lora_delta import LoraDeltaFunction, block_table, triton_lora_delta

__all__ = ["LoraDeltaFunction", "block_table", "triton_lora_delta"]
