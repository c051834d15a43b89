"""Tiny models and hand-made batches for the core tests (random token ids; no tokenizer needed)."""

import torch

from tagi_ds.batch import TaskBatch
from tagi_ds.model import build_backbone, build_model
from tagi_ds.recipes import get_recipe


def tiny_cfg(recipe="tiny", mode="tagi", **sets):
    cfg = get_recipe(recipe)
    cfg.mode = mode
    for section, values in sets.items():
        for k, v in values.items():
            setattr(getattr(cfg, section), k, v)
    return cfg


def tiny_model(recipe="tiny", stage="finetune", mode="tagi", rows=3, teacher=True, seed=0, **sets):
    torch.manual_seed(seed)
    cfg = tiny_cfg(recipe, mode, **sets)
    return build_model(cfg, stage, build_backbone(cfg), num_bank_rows=rows, with_teacher=teacher)


def make_batch(arch, counts=(3, 2), L=7, Lt=5, Li=6, V=1024, seed=1, teacher_rows=None):
    """Examples grouped by task (``counts[k]`` examples for task k), with padding in places."""
    g = torch.Generator().manual_seed(seed)
    K, B = len(counts), sum(counts)
    ids = torch.randint(4, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, -2:] = 0
    ids[0, -2:] = 0
    if arch == "t5":
        labels = torch.randint(4, V, (B, Lt), generator=g)
        labels[1, -2:] = -100
    else:
        labels = ids.clone()
        labels[:, :3] = -100
        labels[mask == 0] = -100
    instr = torch.randint(4, V, (K, Li), generator=g)
    imask = torch.ones(K, Li, dtype=torch.long)
    imask[-1, -3:] = 0
    instr[-1, -3:] = 0
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    rows = torch.tensor(teacher_rows if teacher_rows is not None else list(range(K)))
    # The teacher reads instruction + input: here a different token sequence with the same labels.
    t_ids = torch.cat([torch.randint(4, V, (B, 3), generator=g), ids], dim=1)
    t_mask = torch.cat([torch.ones(B, 3, dtype=torch.long), mask], dim=1)
    t_labels = labels if arch == "t5" else torch.cat([torch.full((B, 3), -100), labels], dim=1)
    return TaskBatch(
        ids, mask, labels, offsets, instr, imask, rows, t_ids, t_mask, t_labels, task_names=[f"t{k}" for k in range(K)]
    )


def perturb(model, seed=1, std=0.05):
    """A generator whose head_B is not zero, so the generated deltas are not zero (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in model.generator.head_B:
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * std)
