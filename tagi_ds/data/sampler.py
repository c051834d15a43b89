"""Task-grouped micro-batch plans: k tasks x m examples, sharded by rank, deterministic and resumable."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from tagi_ds.data.task import DataError


class Segment(NamedTuple):
    """One task's rows of a micro-batch: ``examples`` index that task's instances; ``variant`` is a random
    31-bit number drawn with the plan (it picks a definition paraphrase, a reference, an a|b|c cut)."""

    task: int
    examples: tuple[int, ...]
    variant: int


class TaskBatchSampler:
    """Infinite iterator of micro-batch plans (``list[Segment]``), ``epoch``-based, with exact resume.

    Epoch ``e`` (numpy ``default_rng([seed, e])``): each task's instances are shuffled and cut into groups
    of ``m`` (the last group wraps around to the task's first shuffled instances, so every group has ``m``
    rows and a task with fewer than ``m`` instances repeats some); all groups are shuffled and each draws a
    variant; runs of ``k`` consecutive groups are the epoch's global micro-batches (left-over groups wait
    for the next epoch's shuffle). Groups of the same task in one micro-batch merge into one segment (one
    instruction per task), so a micro-batch always has ``k*m`` rows and ``K <= k`` tasks.

    Sharding: global micro-batch ``g`` goes to rank ``g % world_size`` and each rank takes
    ``steps_per_epoch = num_batches // world_size`` steps, so ranks get disjoint batches and the same step
    count. ``state_dict()`` is ``(epoch, step)``; ``load_state_dict`` continues exactly where it stopped.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        tasks_per_batch: int,
        examples_per_task: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not sizes or min(sizes) < 1:
            raise DataError(f"sampler: every task needs >= 1 instance, got sizes {list(sizes)[:10]}...")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.sizes = [int(n) for n in sizes]
        self.k, self.m, self.seed = tasks_per_batch, examples_per_task, seed
        self.rank, self.world_size = rank, world_size
        num_groups = sum(-(-n // self.m) for n in self.sizes)
        self.steps_per_epoch = num_groups // self.k // world_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"data: {num_groups} task groups of data.examples_per_task={self.m} are fewer than "
                f"data.tasks_per_batch={self.k} x world_size={world_size}: not one micro-batch per rank"
            )
        self.epoch, self.step = 0, 0
        self._cache: tuple[int, list[list[Segment]]] | None = None

    def plans(self, epoch: int) -> list[list[Segment]]:
        """This rank's micro-batch plans of ``epoch`` (cached for the current epoch)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        groups: list[tuple[int, np.ndarray]] = []
        for t, n in enumerate(self.sizes):
            rows = np.resize(rng.permutation(n), -(-n // self.m) * self.m)  # wrap around to fill the last group
            groups.extend((t, rows[i : i + self.m]) for i in range(0, len(rows), self.m))
        order = rng.permutation(len(groups))
        variants = rng.integers(0, 2**31, size=len(groups))
        plans = []
        for step in range(self.steps_per_epoch):
            g = step * self.world_size + self.rank
            merged: dict[int, Segment] = {}
            for pos in range(g * self.k, (g + 1) * self.k):
                t, rows = groups[order[pos]]
                rows = tuple(int(r) for r in rows)
                old = merged.get(t)
                merged[t] = old._replace(examples=old.examples + rows) if old else Segment(t, rows, int(variants[pos]))
            plans.append(list(merged.values()))
        self._cache = (epoch, plans)
        return plans

    def __iter__(self):
        return self

    def __next__(self) -> list[Segment]:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        plan = self.plans(self.epoch)[self.step]
        self.step += 1
        return plan

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        # A different world size resumes after the same number of global micro-batches, rounded down.
        self.step = int(state["step"]) * int(state.get("world_size", self.world_size)) // self.world_size


class EvalSampler:
    """One ordered pass over every instance (task by task), ``batch_size`` rows per micro-batch.

    Rank ``r`` takes global batches ``r, r + W, ...``; ranks left short repeat batches from the start so
    all ranks run the same number of forwards (ZeRO-3 needs that): deduplicate results by example id.
    """

    def __init__(self, sizes: Sequence[int], batch_size: int, rank: int = 0, world_size: int = 1):
        rows = [(t, i) for t, n in enumerate(sizes) for i in range(n)]
        chunks = [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]
        if not chunks:
            raise DataError("eval: no instances to evaluate")
        steps = -(-len(chunks) // world_size)
        self.plans = []
        for step in range(steps):
            chunk = chunks[(step * world_size + rank) % len(chunks)]
            segments: dict[int, list[int]] = {}
            for t, i in chunk:
                segments.setdefault(t, []).append(i)
            self.plans.append([Segment(t, tuple(ex), 0) for t, ex in segments.items()])

    def __len__(self) -> int:
        return len(self.plans)

    def __iter__(self):
        return iter(self.plans)
