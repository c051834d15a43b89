"""The one batch type every stage consumes: examples grouped by task.

Examples are sorted by task, so task ``k`` owns rows ``example_offsets[k]:example_offsets[k+1]`` of every
per-example tensor; an adapted layer seeing ``x: [B, L, d]`` turns that into token offsets
``example_offsets * L`` for :func:`tagi_ds.ops.lora_delta`. Each task's instruction appears once.

Field shapes (B examples, K tasks):
- ``input_ids``, ``attention_mask``: ``[B, L]``. T5: encoder input. LLaMA: prompt + target.
- ``labels``: T5 ``[B, Lt]`` decoder targets; LLaMA ``[B, L]`` aligned with ``input_ids``. Pad = -100.
- ``example_offsets``: int64 ``[K+1]``, non-decreasing, ``[0] = 0``, ``[K] = B``.
- ``instr_input_ids``, ``instr_attention_mask``: ``[K, Li]`` one instruction per task (mode ``tagi``).
- ``teacher_index``: int64 ``[K]`` row of the teacher bank for each task (-1: none).
- ``teacher_input_ids``, ``teacher_attention_mask``, ``teacher_labels``: the teacher's view of the same
  examples (instruction + input), for the stage-2 KL term; ``teacher_labels`` has the same label tokens.
- ``task_names``: K names; ``example_ids``: B ids; ``categories``: K category names.
- ``host_offsets``, ``host_teacher_index``: host copies of ``example_offsets`` and ``teacher_index``, taken by ``to``
  when they leave the CPU, so that the step reads them without waiting for the device (``offsets_list``,
  ``teacher_rows_list``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class TaskBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    example_offsets: torch.Tensor
    instr_input_ids: torch.Tensor | None = None
    instr_attention_mask: torch.Tensor | None = None
    teacher_index: torch.Tensor | None = None
    teacher_input_ids: torch.Tensor | None = None
    teacher_attention_mask: torch.Tensor | None = None
    teacher_labels: torch.Tensor | None = None
    task_names: list[str] = field(default_factory=list)
    example_ids: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    host_offsets: tuple[int, ...] | None = None
    host_teacher_index: tuple[int, ...] | None = None

    @property
    def num_tasks(self) -> int:
        return self.example_offsets.numel() - 1

    @property
    def task_of_example(self) -> torch.Tensor:
        """int64 ``[B]``: the task index (0..K-1) of each example."""
        counts = self.example_offsets[1:] - self.example_offsets[:-1]
        # output_size: without it, repeat_interleave reads the total back from the device (a sync on CUDA)
        return torch.repeat_interleave(
            torch.arange(self.num_tasks, device=counts.device), counts, output_size=self.input_ids.shape[0]
        )

    def offsets_list(self) -> list[int]:
        """``example_offsets`` as Python ints: the host copy when the batch was moved off the CPU (no sync)."""
        return list(self.host_offsets) if self.host_offsets is not None else self.example_offsets.tolist()

    def teacher_rows_list(self) -> list[int] | None:
        """``teacher_index`` as Python ints (None without one), from the host copy when there is one."""
        if self.host_teacher_index is not None:
            return list(self.host_teacher_index)
        return None if self.teacher_index is None else self.teacher_index.tolist()

    def to(self, device: torch.device | str) -> TaskBatch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        host = {}
        if self.example_offsets.device.type == "cpu":  # reading a CPU tensor waits for nothing
            host["host_offsets"] = tuple(self.example_offsets.tolist())
        if self.teacher_index is not None and self.teacher_index.device.type == "cpu":
            host["host_teacher_index"] = tuple(self.teacher_index.tolist())
        return replace(self, **moved, **host)

    def num_target_tokens(self) -> int:
        return int((self.labels != -100).sum())
