"""One evaluation step on one batch: the mode's adapters, then greedy generation or answer-choice scoring.

Where the adapters come from (``mode``):

==============  ==========================================  ==================================
mode            adapters for the batch                      backbone reads
==============  ==========================================  ==================================
tagi            generated from each task's instruction      input (+ fused instruction, T5)
concat          the baseline's shared LoRA (or none)         instruction + input
no_instruction  the baseline's shared LoRA (or none)         input
teacher         the task's own row of the teacher bank       instruction + input
==============  ==========================================  ==================================

:class:`EvalStep` is the module the DeepSpeed engine wraps (as ``TagiModel`` is in training): one call per
batch on every rank, so under ZeRO-3 all ranks call the same modules the same number of times. Generation
is HF ``generate`` (greedy, KV cache) under ``state.use(adapters)``; ``synced_gpus`` keeps ranks stepping
together until every rank's sequences have finished. HF greedy search never drops or reorders rows, so the
batch stays grouped by task as the adapted layers require.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.modeling_outputs import BaseModelOutput

from tagi_ds.adapters import AdapterSet
from tagi_ds.backbones.base import cache_kwarg
from tagi_ds.batch import TaskBatch
from tagi_ds.eval.rank import choice_scores
from tagi_ds.stages import MODES

EVAL_MODES = tuple(MODES)
KINDS = ("generate", "rank")


def eval_adapters(
    model, batch: TaskBatch, mode: str, use_bank: bool = True
) -> tuple[AdapterSet | None, torch.Tensor | None]:
    """``(adapters, instruction states [K, Li, d] or None)`` for ``batch`` under ``mode``.

    ``use_bank=False`` (concat / no_instruction without ``--adapter``): the bare backbone, no adapters.
    """
    if mode not in MODES:
        raise ValueError(f"eval mode must be one of {', '.join(EVAL_MODES)}, got {mode!r}")
    return MODES[mode].source.adapters(model, batch, use_bank)


def greedy_config(max_new_tokens: int, eos_id: int, pad_id: int, decoder_start_id: int | None) -> GenerationConfig:
    """A fresh greedy config: a checkpoint's own generation_config.json (beams, penalties) never applies."""
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        decoder_start_token_id=decoder_start_id,
        use_cache=True,
    )


def generate_tokens(
    model,
    batch: TaskBatch,
    adapters: AdapterSet | None,
    instr_states: torch.Tensor | None,
    gen: GenerationConfig,
    synced: bool = False,
) -> torch.Tensor:
    """New tokens ``[B, T]`` (T <= max_new_tokens; after a row's eos: padding).

    T5: the encoder runs once with the adapters; with fusion the decoder cross-attends to
    ``[instruction states ; input states]`` (the same layout as ``TagiModel.logits``), handed to ``generate``
    as ``encoder_outputs`` with the concatenated mask, and (under no_grad) with those states' cross-attention
    keys/values precomputed, each task's instruction projected once (``TagiModel.prefix_cache``).
    LLaMA: ``batch`` holds left-padded prompts.
    """
    backbone = model.backbone
    with model.state.use(adapters):
        if model.causal:
            out = backbone.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                generation_config=gen,
                synced_gpus=synced,
            )
            return out[:, batch.input_ids.shape[1] :]
        hidden, _ = model.arch.encode(backbone, batch.input_ids, batch.attention_mask)
        cache = model.prefix_cache(batch, instr_states, adapters)
        past = cache(hidden) if cache is not None else None
        hidden, mask = model.arch.fuse(hidden, batch.attention_mask, *model.fusion_prefix(batch, instr_states))
        out = backbone.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
            attention_mask=mask,
            generation_config=gen,
            synced_gpus=synced,
            **{cache_kwarg(backbone): past},
        )
        return out[:, 1:]  # drop the decoder start token


def score_targets(
    model, batch: TaskBatch, adapters: AdapterSet | None, instr_states: torch.Tensor | None
) -> torch.Tensor:
    """Length-normalised log-likelihood ``[B]`` of each row's target (``batch.labels``), teacher-forced."""
    logits = model.logits(batch.input_ids, batch.attention_mask, batch.labels, adapters, batch, instr_states)
    return choice_scores(logits, batch.labels, shift=model.causal)


def cut_at_eos(tokens: torch.Tensor, eos_id: int) -> list[list[int]]:
    """Rows of ``[B, T]`` up to (excluding) their first eos."""
    out = []
    for row in tokens.tolist():
        out.append(row[: row.index(eos_id)] if eos_id in row else row)
    return out


class EvalStep(nn.Module):
    """``forward(batch) -> {"tokens": [B, T]}`` (kind generate) or ``{"scores": [B]}`` (kind rank)."""

    def __init__(
        self,
        model: nn.Module,
        mode: str,
        kind: str,
        gen: GenerationConfig | None = None,
        use_bank: bool = True,
        synced: bool = False,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if kind == "generate" and gen is None:
            raise ValueError("kind generate needs a GenerationConfig")
        self.model = model
        self.mode, self.kind, self.gen, self.use_bank, self.synced = mode, kind, gen, use_bank, synced

    def forward(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        adapters, states = eval_adapters(self.model, batch, self.mode, self.use_bank)
        if self.kind == "rank":
            return {"scores": score_targets(self.model, batch, adapters, states)}
        return {"tokens": generate_tokens(self.model, batch, adapters, states, self.gen, self.synced)}
