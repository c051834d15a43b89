"""Memory and step-time planner for stage-2 TAGI training (finetune, mode tagi, teacher KL + param-MSE).

    python -m tagi_ds.plan --model t5-xxl --nodes 4 --gpus_per_node 8 --gpu_mem_gb 80
    python -m tagi_ds.plan --model llama-13b --gpu_mem_gb 24 --stage z2 --json
    python -m tagi_ds.plan --model tiny --stage none --measure      # predicted vs measured, this machine

One concept per module (each module's docstring holds its definitions):

- ``inputs``: ``PlanInput`` (the flags), ``resolve`` against the recipe, ``shapes_of``, the DeepSpeed JSON.
- ``shapes``: ``Shapes`` and ``Counts``: parameter counts from the recipe's shapes (built on the meta device).
- ``gpu_memory``: the per-GPU memory terms, the activation formulas and the peak ``total``.
- ``flops``: ``step_flops`` (the FLOP formula) and ``step_time`` (compute vs communication).
- ``placement``: where the frozen backbone lives under ZeRO-3 (``choose``: replicated where it fits, else
  partitioned; ``for_run``: the same for a training run, used by ``tagi_ds.runtime.engine``).
- ``fit``: ``plan`` (everything in one dict), ``fits``, ``max_micro_batch``, ``suggest``.
- ``measure``: ``measure_step`` (the measured quantity of the planner's check), ``synthetic_batch``,
  ``TensorBytesTracker``.
- ``cli``: argparse, the rich tables and ``--json`` (``python -m tagi_ds.plan``); not re-exported here, so that
  importing the planner's functions (``train/loop.py`` does) never imports a command line.

What has been checked: the fp32 path against ``measure_step`` on CPU (tests/plan/test_plan.py: tiny T5 and LLaMA,
checkpointing on and off, within a few percent), and ``step_flops`` against torch's FlopCounterMode. The bf16
specifics (T5's extra fp32 norm input, bf16 logits), the GPU attention kernels' saved tensors and DeepSpeed's
buffers follow the code of torch 2.13 / transformers 5.23 / deepspeed 0.19.8 but have not been measured on a
GPU yet: run ``--measure`` there (one GPU, ``--stage none``) to check.
"""

from tagi_ds.plan.fit import ESCALATION, fits, max_micro_batch, plan, suggest
from tagi_ds.plan.flops import (
    adapter_flops,
    backbone_forward_flops,
    cross_kv_flops,
    step_flops,
    step_time,
    zero3_hook_calls,
)
from tagi_ds.plan.gpu_memory import activations, memory, saved_layer, usable_bytes
from tagi_ds.plan.inputs import (
    ASSUMED_MFU,
    BACKBONES,
    DS_CONFIGS,
    H100_BF16_DENSE_TFLOPS,
    ZERO3_HOOK_US,
    GiB,
    PlanInput,
    ds_zero,
    resolve,
    shapes_of,
)
from tagi_ds.plan.measure import TensorBytesTracker, measure_step, storage_bytes, synthetic_batch
from tagi_ds.plan.placement import choose, for_run, for_training
from tagi_ds.plan.shapes import Counts, Shapes, build_meta, count

__all__ = [
    "ASSUMED_MFU",
    "BACKBONES",
    "DS_CONFIGS",
    "ESCALATION",
    "GiB",
    "H100_BF16_DENSE_TFLOPS",
    "ZERO3_HOOK_US",
    "Counts",
    "PlanInput",
    "Shapes",
    "TensorBytesTracker",
    "activations",
    "adapter_flops",
    "backbone_forward_flops",
    "build_meta",
    "choose",
    "count",
    "cross_kv_flops",
    "ds_zero",
    "fits",
    "for_run",
    "for_training",
    "max_micro_batch",
    "measure_step",
    "memory",
    "plan",
    "resolve",
    "saved_layer",
    "shapes_of",
    "step_flops",
    "step_time",
    "storage_bytes",
    "suggest",
    "synthetic_batch",
    "usable_bytes",
    "zero3_hook_calls",
]
