"""Two ZeRO-3 TAGI engines built one after the other in each rank, 2 steps each, then destroyed: prints, per rank,
the TagiModel / DeepSpeedZeroOptimizer_Stage3 objects the garbage collector still sees before and after
``zero_release.release`` (tests/runtime/test_zero_release.py; ``--no_release``: the counts without it)."""

import gc
import json
import sys
from pathlib import Path

import torch

from tagi_ds import assembly, plan, stages
from tagi_ds.config import apply_overrides
from tagi_ds.model import TagiModel
from tagi_ds.recipes import get_recipe
from tagi_ds.runtime import dist, zero_release
from tagi_ds.runtime import engine as ds_engine


def alive() -> dict[str, int]:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    gc.collect()
    objs = gc.get_objects()
    return {
        "TagiModel": sum(isinstance(o, TagiModel) for o in objs),
        "DeepSpeedZeroOptimizer_Stage3": sum(isinstance(o, DeepSpeedZeroOptimizer_Stage3) for o in objs),
    }


def one_case(seed: int) -> dict | None:
    cfg = apply_overrides(
        get_recipe("tiny"), ["data.tasks_per_batch=2", "data.examples_per_task=1", "train.frozen_backbone=partitioned"]
    ).validate()
    ds = ds_engine.inject(ds_engine.load_ds_json(ds_engine.default_ds_config(cfg.recipe)), cfg, dist.world_size())
    torch.manual_seed(seed)
    run = assembly.assemble(
        stages.spec("finetune", cfg),
        cfg,
        ds,
        {},
        world_size=dist.world_size(),
        placement=plan.for_training(cfg, ds, dist.world_size()),
        rows=4,
        teacher=True,
    )
    model, eng = run.model, run.runner
    batch = plan.synthetic_batch(
        cfg.model.arch, plan.Shapes(2, 2, 16, 4, 16), cfg.model.vocab_size, mode=cfg.mode, teacher=True, seed=seed
    )
    for _ in range(2):  # the release cache fills from the second step on (a complete trace)
        loss, _ = eng(batch)
        eng.backward(loss)
        eng.step()
    eng.destroy()
    if "--no_release" not in sys.argv:
        released = zero_release.release(model)
        print("released", json.dumps(released), flush=True)
        return released
    return None


if __name__ == "__main__":
    dist.init()
    released = [one_case(seed) for seed in (0, 1)]
    counts = alive()
    print(f"rank {dist.rank()} alive", json.dumps(counts), flush=True)
    if "--out" in sys.argv:  # one file per rank: two ranks' lines on one stdout can interleave
        out = Path(sys.argv[sys.argv.index("--out") + 1])
        (out / f"rank{dist.rank()}.json").write_text(json.dumps({"released": released, "alive": counts}))
    dist.shutdown()
