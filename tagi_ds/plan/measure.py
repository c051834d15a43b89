"""The planner's check: one real training step, measured (``measure_step``, ``--measure``).

Measured quantity of the 10% check (``measure_step``, ``--measure``, tests/plan/test_plan.py): one training step
(forward, backward, AdamW step) of the given recipe in ONE process without DeepSpeed (``--stage none``), after
a warm-up step (so optimizer state exists), on a synthetic batch of exactly the given shapes
(``synthetic_batch``). On CPU the peak is tracked tensor bytes: the storages alive when the step starts
(parameters, buffers, optimizer state, batch) plus the high-water mark of every tensor storage allocated during
the step (a TorchDispatchMode sees each allocation; weakref finalizers see each free). It excludes allocator
caching, fragmentation and Python objects, like ``torch.cuda.max_memory_allocated``, which is used on a GPU.
The benchmarks (benchmarks/bench_train_step.py) report the same tracked bytes with ``TensorBytesTracker``.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tagi_ds import families
from tagi_ds.batch import TaskBatch
from tagi_ds.plan.inputs import PlanInput, resolve, shapes_of
from tagi_ds.plan.shapes import Shapes
from tagi_ds.stages import MODES


def synthetic_batch(
    arch: str, s: Shapes, vocab: int, mode: str = "tagi", teacher: bool = True, seed: int = 0
) -> TaskBatch:
    """Random ids at exactly ``s``'s lengths, K equal task segments, one padded position per view (so padding
    masks exist, as in real batches). T5: input [B, L] (concat: Li + L), labels [B, Lt]. Decoder-only: prompt + target
    in one row, labels -100 on the prompt. The teacher view is instruction + input."""
    enc_dec = families.get(arch).encoder_decoder
    g = torch.Generator().manual_seed(seed)
    B, K, L, Lt, Li = s.micro_batch, s.tasks, s.seq_len, s.target_len, s.instr_len
    counts = [B // K + (1 if k < B % K else 0) for k in range(K)]
    ids = lambda *shape: torch.randint(4, vocab, shape, generator=g)  # noqa: E731

    def view(prompt_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if enc_dec:
            x, labels = ids(B, prompt_len), ids(B, Lt)
        else:
            x = ids(B, prompt_len + Lt)
            labels = x.clone()
            labels[:, :prompt_len] = -100
        mask = torch.ones_like(x)
        mask[0, -1] = 0
        x[0, -1] = 0
        if not enc_dec:
            labels[0, -1] = -100
        return x, mask, labels

    row = MODES[mode]
    x, mask, labels = view(L + Li if row.instruction_in_input else L)
    offsets = torch.tensor([0, *counts]).cumsum(0)
    batch = TaskBatch(x, mask, labels, offsets, task_names=[f"task{k}" for k in range(K)])
    if row.instruction:
        batch.instr_input_ids, batch.instr_attention_mask = ids(K, Li), torch.ones(K, Li, dtype=torch.long)
        batch.instr_attention_mask[-1, -1] = 0
        if teacher:
            batch.teacher_index = torch.arange(K)
            tx, tmask, tlabels = view(Li + L)
            if enc_dec:
                tlabels = labels
            batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_labels = tx, tmask, tlabels
    return batch


class TensorBytesTracker(TorchDispatchMode):
    """Live bytes of tensor storages allocated while active (and their high-water mark, ``peak``).

    Storages alive before entering are ``known`` and never counted, so views and in-place updates of
    parameters and optimizer state do not count as new memory. Frees are seen through weakref finalizers."""

    def __init__(self, known: list[torch.Tensor] = ()) -> None:
        super().__init__()
        self.known = {self._key(t) for t in known}
        self.live: dict[tuple[str, int], int] = {}
        self.current = self.peak = 0

    @staticmethod
    def _key(t: torch.Tensor) -> tuple[str, int]:
        return (t.device.type, t.untyped_storage().data_ptr())

    def _free(self, key: tuple[str, int]) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key, n = self._key(t), storage.nbytes()
                if n and key not in self.live and key not in self.known:
                    self.live[key] = n
                    self.current += n
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


def storage_bytes(tensors) -> int:
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and not t.is_meta:
            seen[(t.device.type, t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()
    return sum(seen.values())


def measure_step(p: PlanInput, device: str | None = None, seed: int = 0) -> dict[str, int]:
    """Peak bytes of one plain-torch training step at ``p``'s shapes (definition in the module docstring)."""
    from tagi_ds import assembly, stages

    p, cfg = resolve(p)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if p.precision == "bf16" else torch.float32
    torch.manual_seed(seed)
    s = shapes_of(p)
    weight = 1.0 if p.kl else 0.0  # the teacher terms run exactly when the plan has them
    cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, kl_weight=weight, param_weight=weight))
    rows = max(p.teacher_rows, s.tasks)
    run = assembly.assemble(
        stages.spec("finetune", cfg), cfg, {}, {}, runner="torch", rows=rows, teacher=p.kl, device=dev, dtype=dtype
    )
    model = run.model
    batch = synthetic_batch(cfg.model.arch, s, cfg.model.vocab_size, teacher=p.kl, seed=seed).to(dev)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)

    def step() -> None:
        loss, _ = model(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state exists from here on
    state = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    batch_tensors = [v for v in vars(batch).values() if torch.is_tensor(v)]
    known = [*model.parameters(), *model.buffers(), *state, *batch_tensors]
    static = {
        "parameters": storage_bytes(model.parameters()),
        "buffers": storage_bytes(model.buffers()),
        "optimizer": storage_bytes(state),
        "batch": storage_bytes(batch_tensors),
    }
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return {
            **static,
            "baseline": base,
            "step_peak": torch.cuda.max_memory_allocated() - base,
            "peak": torch.cuda.max_memory_allocated(),
        }
    with TensorBytesTracker(known) as tracker:
        step()
    base = storage_bytes(known)
    return {**static, "baseline": base, "step_peak": tracker.peak, "peak": base + tracker.peak}
