"""Micro-batch plans -> ``TaskBatch`` (see ``tagi_ds.batch`` for the contract), per architecture and view.

Token layout (``eos``/``bos`` are the tokenizer's; every ``encode`` is without special tokens):

- T5 (encoder-decoder): ``input_ids`` = prompt + eos; ``labels`` = target + eos, padded with -100;
  instruction = instruction + eos. All right-padded.
- LLaMA (decoder-only): ``input_ids`` = bos + prompt + target + eos and ``labels`` the same tokens with
  -100 on bos, prompt and padding (HF convention: aligned, the model shifts); instruction = bos +
  instruction. ``padding_side`` "right" for training; "left" with ``with_targets=False`` for generation,
  where ``input_ids`` = bos + prompt (left-padded) and ``labels`` = target + eos ``[B, Lt]`` as for T5.

Budgets: prompt <= ``max_source_length - 1``, target <= ``max_target_length - 1``, instruction <=
``max_instruction_length - 1`` tokens (+1 special token each). The concat view (``concat`` mode, teachers,
the teacher's KL view) is instruction (<= ``max_instruction_length``) + Tk-Instruct instance part
(<= ``max_source_length - 1``), tokenised in those two pieces. Truncation keeps the head and is counted
in ``collator.stats`` (``truncated_instruction`` per task, ``truncated_input`` / ``truncated_target`` per
example; the teacher's view is not counted twice).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from tagi_ds import families
from tagi_ds.batch import TaskBatch
from tagi_ds.config import DataConfig
from tagi_ds.data.corpus import split_abc
from tagi_ds.data.prompt import chat_format, format_instance, format_instruction
from tagi_ds.data.sampler import Segment
from tagi_ds.data.task import Task

IGNORE_INDEX = -100


def pad(rows: Sequence[Sequence[int]], value: int, side: str = "right") -> torch.Tensor:
    """int64 ``[len(rows), longest]`` padded with ``value`` on ``side``."""
    out = torch.full((len(rows), max(map(len, rows), default=0)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            span = slice(out.shape[1] - len(row), None) if side == "left" else slice(0, len(row))
            out[i, span] = torch.tensor(row, dtype=torch.long)
    return out


class _Collator:
    """Shared token layout and truncation counters."""

    def __init__(self, tokenizer, cfg: DataConfig, arch: str, padding_side: str = "right", with_targets: bool = True):
        if arch not in families.FAMILIES:
            raise ValueError(f"arch must be one of {', '.join(families.names())}, got {arch!r}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be right or left, got {padding_side!r}")
        self.tok, self.cfg, self.arch, self.side, self.with_targets = tokenizer, cfg, arch, padding_side, with_targets
        self.causal = families.get(arch).causal  # decoder-only: the LLaMA layout below, whatever the family
        self.chat = None  # TaskCollator: data.chat_template's ChatFormat (prompt.py)
        self.stats: Counter = Counter()
        self._bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []

    def cut(self, ids: list[int], limit: int, field: str | None) -> list[int]:
        if len(ids) <= limit:
            return ids
        if field:
            self.stats[f"truncated_{field}"] += 1
        return ids[: max(limit, 0)]

    def instruction_row(self, ids: list[int]) -> list[int]:
        body = self.cut(ids, self.cfg.max_instruction_length - 1, "instruction")
        body = self.chat.wrap(body, reply=False) if self.chat else body
        return self._bos + body if self.causal else body + [self.tok.eos_id]

    def example_rows(self, prompt: list[int], target: list[int]) -> tuple[list[int], list[int]]:
        """(input row, label row) for a prompt and a target (both already cut to their budgets)."""
        eos = self.tok.eos_id
        if not self.causal:  # encoder input and decoder target, each closed by eos
            return prompt + [eos], target + [eos]
        if not self.with_targets:
            return self._bos + prompt, target + [eos]
        head = self._bos + prompt
        return head + target + [eos], [IGNORE_INDEX] * len(head) + target + [eos]

    def tensors(self, inputs: list[list[int]], labels: list[list[int]]) -> tuple[torch.Tensor, ...]:
        side = self.side if self.causal else "right"
        ids = pad(inputs, self.tok.pad_id, side)
        mask = pad([[1] * len(r) for r in inputs], 0, side)
        return ids, mask, pad(labels, IGNORE_INDEX, side if self.causal and self.with_targets else "right")

    def report(self) -> str:
        s = self.stats
        return (
            f"truncated: instruction {s['truncated_instruction']}/{s['instructions']} tasks, "
            f"input {s['truncated_input']}/{s['examples']} examples, "
            f"target {s['truncated_target']}/{s['examples']} examples"
        )


class TaskCollator(_Collator):
    """Segments of task instances -> TaskBatch.

    ``input_view``: "input" (the instance input alone) or "concat" (Tk-Instruct instruction + instance).
    ``instruction``: fill ``instr_*`` (one row per task). ``teacher_view``: fill ``teacher_*`` with the
    concat view and the same targets. ``teacher_rows``: name -> bank row, looked up by task name or, with
    ``teacher_key="category"``, by category (-1 when absent). ``sample``: train-time draws from the
    segment's variant (a definition paraphrase per task, one of several accepted outputs); otherwise the
    first definition and the first output.
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        tokenizer,
        cfg: DataConfig,
        *,
        arch: str = "t5",
        input_view: str = "input",
        instruction: bool = True,
        teacher_view: bool = False,
        teacher_rows: dict[str, int] | None = None,
        teacher_key: str = "task",
        sample: bool = False,
        padding_side: str = "right",
        with_targets: bool = True,
    ):
        super().__init__(tokenizer, cfg, arch, padding_side, with_targets)
        if input_view not in ("input", "concat"):
            raise ValueError(f"input_view must be input or concat, got {input_view!r}")
        if teacher_key not in ("task", "category"):
            raise ValueError(f"teacher_key must be task or category, got {teacher_key!r}")
        self.tasks, self.input_view, self.instruction = list(tasks), input_view, instruction
        self.teacher_view = teacher_view
        self.teacher_rows, self.teacher_key, self.sample = teacher_rows, teacher_key, sample
        self._instr: dict[tuple[int, int, bool], list[int]] = {}
        self.chat = chat_format(tokenizer) if cfg.chat_template else None

    def instruction_tokens(self, t: int, definition: int, message: bool = False) -> list[int]:
        """``message``: as a chat message, stripped (prompt.py: templates such as Llama-3's trim it)."""
        key = (t, definition, message)
        if key not in self._instr:  # a handful per task: cached, unlike per-example tokens
            text = format_instruction(self.tasks[t], self.cfg.setting, self.cfg.num_pos, definition)
            self._instr[key] = self.tok.encode(text.strip() if message else text)
        return self._instr[key]

    def prompt(self, text: str, instr: list[int], concat: bool, count: bool) -> list[int]:
        budget = self.cfg.max_source_length - 1
        if not concat:
            ids = self.cut(self.tok.encode(text.strip()), budget, "input" if count else None)
        else:
            head = self.cut(instr, self.cfg.max_instruction_length, "instruction" if count else None)
            instance = format_instance(text).rstrip() if self.chat else format_instance(text)  # a stripped message
            ids = head + self.cut(self.tok.encode(instance), budget, "input" if count else None)
        return self.chat.wrap(ids, reply=True) if self.chat else ids

    def __call__(self, plan: Sequence[Segment]) -> TaskBatch:
        inputs, labels, t_inputs, t_labels, instr_rows = [], [], [], [], []
        names, cats, ids, counts = [], [], [], []
        for seg in plan:
            task = self.tasks[seg.task]
            definition = seg.variant % len(task.definitions) if self.sample else 0
            instr = self.instruction_tokens(seg.task, definition)
            if self.instruction:
                msg = self.instruction_tokens(seg.task, definition, message=True) if self.chat else instr
                instr_rows.append(self.instruction_row(msg))
                self.stats["instructions"] += 1
            for j, e in enumerate(seg.examples):
                ex = task.instances[e]
                answer = ex.outputs[(seg.variant + j) % len(ex.outputs)] if self.sample else ex.outputs[0]
                target = self.cut(self.tok.encode(answer), self.cfg.max_target_length - 1, "target")
                row, lab = self.example_rows(self.prompt(ex.input, instr, self.input_view == "concat", True), target)
                inputs.append(row)
                labels.append(lab)
                if self.teacher_view:
                    row, lab = self.example_rows(self.prompt(ex.input, instr, True, False), target)
                    t_inputs.append(row)
                    t_labels.append(lab)
                ids.append(ex.id)
            names.append(task.name)
            cats.append(task.category)
            counts.append(len(seg.examples))
        self.stats["examples"] += len(inputs)
        input_ids, mask, label_ids = self.tensors(inputs, labels)
        batch = TaskBatch(
            input_ids,
            mask,
            label_ids,
            torch.tensor([0, *counts]).cumsum(0),
            task_names=names,
            example_ids=ids,
            categories=cats,
        )
        if self.instruction:
            side = self.side if self.causal else "right"
            batch.instr_input_ids = pad(instr_rows, self.tok.pad_id, side)
            batch.instr_attention_mask = pad([[1] * len(r) for r in instr_rows], 0, side)
        if self.teacher_view:
            t_ids, t_mask, t_labels = self.tensors(t_inputs, t_labels)
            batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_labels = t_ids, t_mask, t_labels
        if self.teacher_rows is not None:
            keys = names if self.teacher_key == "task" else cats
            batch.teacher_index = torch.tensor([self.teacher_rows.get(k, -1) for k in keys], dtype=torch.long)
        return batch


class PretrainCollator(_Collator):
    """Stage 1: windows ``[(name, tokens, variant)]`` -> TaskBatch with one task per window (K = B):
    ``instr_*`` = a, ``input_ids`` = b, ``labels`` = c (cut points drawn from the variant)."""

    def __call__(self, plan: Sequence[tuple[str, Sequence[int], int]]) -> TaskBatch:
        inputs, labels, instr_rows = [], [], []
        for _, tokens, variant in plan:
            a, b, c = split_abc(tokens, variant, self.cfg.max_source_length - 1, self.cfg.max_target_length - 1)
            instr_rows.append(self.instruction_row(a))
            prompt = self.cut(b, self.cfg.max_source_length - 1, "input")
            target = self.cut(c, self.cfg.max_target_length - 1, "target")
            row, lab = self.example_rows(prompt, target)
            inputs.append(row)
            labels.append(lab)
        self.stats["examples"] += len(plan)
        self.stats["instructions"] += len(plan)
        input_ids, mask, label_ids = self.tensors(inputs, labels)
        names = [name for name, _, _ in plan]
        side = self.side if self.causal else "right"
        return TaskBatch(
            input_ids,
            mask,
            label_ids,
            torch.arange(len(plan) + 1),
            instr_input_ids=pad(instr_rows, self.tok.pad_id, side),
            instr_attention_mask=pad([[1] * len(r) for r in instr_rows], 0, side),
            task_names=names,
            example_ids=names,
            categories=["pretrain"] * len(plan),
        )
