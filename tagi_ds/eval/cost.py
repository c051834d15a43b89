"""Inference cost of an evaluation, per example: wall time and FLOPs (counted, or by a formula).

``counter`` (the default on CPU): ``torch.utils.flop_counter.FlopCounterMode`` around each batch's step counts
the FLOPs of every matmul, attention and convolution that really ran (instruction encoding, hypernetwork,
adapter deltas through the torch reference op, encoder, every decoding step with its KV cache). It sees
only aten ops: a Triton kernel's FLOPs are invisible to it, hence:

``formula`` (the default on GPU, where the Triton adapter kernel runs and a dispatch mode would slow every
op): ``2 * N * tokens`` for each stack a token passes through, N = the weights of that stack's Linear
layers (embedding lookups and attention scores are not counted):

- T5: ``2 N_enc`` per real input token; ``2 N_dec`` per decoder token (generated tokens including eos, or
  the target tokens when scoring), where ``N_dec`` excludes the cross-attention k/v projections, which
  run once per encoder position the decoder reads: ``2 N_kv`` per input token; with fusion (the decoder
  reads [instruction ; input] states) also ``2 N_kv`` per instruction token, once per task per batch
  (``TagiModel.prefix_cache`` projects each task's instruction states once, not per example).
- LLaMA: ``2 N`` per token of prompt + generated tokens (each token once, KV cache).
- adapters: ``2 r (d_in + d_out)`` per token per adapted projection it passes through.
- TAGI: each task's instruction is encoded once per batch (``2 N_enc`` / ``2 N_body`` per instruction
  token, + its cross-attention k/v with fusion) and the generator runs once per task per batch
  (``2 (S N_trunk + sum_g S_g h (r d_in + d_out r))``); both are shared evenly by that task's examples in
  the batch. ``concat`` instead pays the instruction's tokens in every example's input, which the
  per-example token counts already include.

Wall time is measured around each batch's step; with ``counter`` it includes the counter's Python dispatch
overhead (about x2 on the tiny CPU models, ``cost.wall_includes_counter`` in results.json): compare wall
times between runs with the same method, or time with ``formula``.

A batch's counted FLOPs and its wall time are shared evenly by its rows (batches are small and task-grouped);
formula FLOPs are per example. Duplicate batches that pad short ranks are dropped with their examples.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from tagi_ds.batch import TaskBatch

METHODS = ("auto", "counter", "formula")


def resolve_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"flops method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "auto":
        return "formula" if torch.cuda.is_available() else "counter"
    return method


@dataclass
class Measured:
    wall_s: float = 0.0
    flops: float | None = None  # counted FLOPs of the whole batch (method counter)


@contextmanager
def measure(method: str, device: torch.device):
    """Time the block (synchronising the device) and, for ``counter``, count its FLOPs."""
    box = Measured()
    counter = None
    if method == "counter":
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        counter.__enter__()
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels are asynchronous: time the work, not its launch
        box.wall_s = time.perf_counter() - t0
        if counter is not None:
            counter.__exit__(None, None, None)
            box.flops = float(counter.get_total_flops())


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 leaves an empty placeholder locally


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


class FlopFormula:
    """Per-example FLOPs by the formula above, for one TagiModel (parameter counts taken once)."""

    def __init__(self, model: nn.Module, rank: int = 0) -> None:
        self.causal, self.fusion = model.causal, model.fusion
        self.rank = rank  # adapter rank (0: no adapters in this evaluation)
        enc = dec = kv = head = 0
        for name, mod in model.backbone.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            n = _numel(mod.weight)
            if name.startswith("encoder."):
                enc += n
            elif ".EncDecAttention.k" in name or ".EncDecAttention.v" in name:
                kv += n
            else:
                dec += n
                head += n if name.startswith("lm_head") else 0
        self.n_enc, self.n_dec, self.n_kv, self.n_body = enc, dec, kv, dec - head
        self.lora = {"enc": 0, "dec": 0, "mem": 0}  # sum of r (d_in + d_out) over sites, by the tokens they see
        for s in model.sites:
            key = "enc" if s.stack == "encoder" else "mem" if s.stack == "cross" and s.kind in ("k", "v") else "dec"
            self.lora[key] += s.d_in + s.d_out
        self.generator = 0
        gen = getattr(model, "generator", None)
        if gen is not None:
            trunk = sum(_numel(m.weight) for m in gen.trunk if isinstance(m, nn.Linear))
            # head weights are [1 or S_g, hidden, out]: every site of a group costs hidden * out either way
            heads = sum(
                len(g) * _shape(a.weight)[1] * (_shape(a.weight)[2] + _shape(b.weight)[2])
                for g, a, b in zip(gen.groups, gen.head_A, gen.head_B)
            )
            self.generator = 2 * (gen.num_sites * trunk + heads)

    def per_example(self, batch: TaskBatch, decoder_tokens: torch.Tensor, tagi: bool, generated: bool) -> list[float]:
        """FLOPs of each row. ``decoder_tokens [B]``: generated tokens incl. eos (``generated``) or scored target
        tokens (LLaMA: already inside ``input_ids``). ``tagi``: add instruction encoding and the generator."""
        r2 = 2 * self.rank
        inputs = batch.attention_mask.sum(1).double().cpu()
        dec = decoder_tokens.double().cpu()
        task = batch.task_of_example.cpu()
        instr = torch.zeros(batch.num_tasks, dtype=torch.float64)
        per_task = torch.zeros(batch.num_tasks, dtype=torch.float64)
        if tagi and batch.instr_attention_mask is not None:
            instr = batch.instr_attention_mask.sum(1).double().cpu()
            rows = (batch.example_offsets[1:] - batch.example_offsets[:-1]).double().cpu().clamp(min=1)
            body = self.n_body if self.causal else self.n_enc
            prefix_kv = (2 * self.n_kv + r2 * self.lora["mem"]) * instr if self.fusion and not self.causal else 0.0
            per_task = (2 * body * instr + prefix_kv + self.generator) / rows
        if self.causal:
            tokens = inputs + dec if generated else inputs
            flops = 2 * self.n_dec * tokens + r2 * self.lora["dec"] * tokens
        else:
            flops = (
                2 * self.n_enc * inputs
                + 2 * self.n_dec * dec
                + 2 * self.n_kv * inputs
                + r2 * (self.lora["enc"] * inputs + self.lora["dec"] * dec + self.lora["mem"] * inputs)
            )
        return (flops + per_task[task]).tolist()
