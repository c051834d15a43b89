"""A replicated frozen backbone under ZeRO-3 (``train.frozen_backbone``): where it is chosen, and that it trains as
the partitioned one does while DeepSpeed never sees it (no ZeRO-3 parameters, hooks or F.linear replacement)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tagi_ds.config import ConfigError, apply_overrides
from tagi_ds.plan import for_training
from tagi_ds.recipes import get_recipe
from tests.train.harness import HANG_S, REPO, env

Z3 = {"zero_optimization": {"stage": 3}}


def _cfg(*overrides: str):
    return apply_overrides(get_recipe("tiny"), list(overrides)).validate()


def test_placement_follows_the_config_and_the_stage():
    assert for_training(_cfg(), {"zero_optimization": {"stage": 2}}, 1)[0] == "whole"
    # auto on a CPU: partitioned (the CPU runs exercise ZeRO-3 partitioning at tiny scale)
    placement, why = for_training(_cfg(), Z3, 2)
    assert placement == "partitioned" and "CPU" in why
    assert for_training(_cfg("train.frozen_backbone=replicated"), Z3, 2)[0] == "replicated"
    assert for_training(_cfg('model.trainable=["shared"]'), Z3, 2)[0] == "partitioned"
    with pytest.raises(ConfigError, match="model.trainable unfreezes"):
        for_training(_cfg("train.frozen_backbone=replicated", 'model.trainable=["shared"]'), Z3, 1)
    offload = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    with pytest.raises(ConfigError, match="offload_param"):
        for_training(_cfg("train.frozen_backbone=replicated"), offload, 1)
    with pytest.raises(ConfigError, match="train.frozen_backbone"):
        _cfg("train.frozen_backbone=sharded")


ENGINES = r"""
import torch
from tagi_ds.config import apply_overrides
from tagi_ds import stages
from tagi_ds.assembly import assemble
from tagi_ds.plan import synthetic_batch, Shapes
from tagi_ds.plan import for_training
from tagi_ds.recipes import get_recipe
from tagi_ds.runtime import dist, engine as E
dist.init()
# replicated first: a partitioned build replaces F.linear for good
# loss.param_align=delta: the placements must agree to 1e-5; the relative term divides by the random bank's tiny
# teacher deltas, which magnifies the two placements' float-order differences (1.9e-5 at step 3), not a placement bug
for placement, mode in (("replicated", "tagi"), ("replicated", "no_instruction"), ("partitioned", "tagi"),
                        ("partitioned", "no_instruction")):
    cfg = apply_overrides(get_recipe("tiny"), [f"train.frozen_backbone={placement}", "train.lr=1e-2", f"mode={mode}",
                                               "data.tasks_per_batch=2", "data.examples_per_task=2",
                                               "loss.param_align=delta"]).validate()
    batch = synthetic_batch("t5", Shapes(4, 2, 16, 8, 16), 1024, mode=mode)
    ds = E.inject(E.load_ds_json(E.TINY_DS_CONFIG), cfg, 1)
    torch.manual_seed(0)
    run = assemble(stages.spec("finetune", cfg), cfg, ds, {}, placement=for_training(cfg, ds, 1), rows=2,
                   teacher=mode == "tagi")
    model, eng = run.model, run.runner
    placement = f"{placement}-{mode}"
    trained = model.generator if mode == "tagi" else model.bank
    calls = []  # kept whole, it runs without the module call (and its ZeRO-3 hooks)
    trained.register_forward_pre_hook(lambda m, a: calls.append(1))
    losses = []
    for _ in range(3):
        loss, _ = eng(batch)
        eng.backward(loss)
        eng.step()
        losses.append(loss.item())
    bb = list(model.backbone.modules())
    print(placement, "LOSSES", losses)
    print(placement, "ZERO_PARAMS", sum(hasattr(p, "ds_id") for p in model.backbone.parameters()),
          "HOOKED", sum(bool(m._forward_pre_hooks) for m in bb), "OF", len(bb),
          "LINEAR", torch.nn.functional.linear.__name__)
    print(placement, "CALLS", len(calls))
    print(placement, "KEYS", sorted(k for k, p in eng.module.named_parameters() if p.requires_grad))
    print(placement, "LINE", run.describe())
    eng.destroy()
"""


def test_a_replicated_backbone_trains_like_a_partitioned_one_outside_deepspeed():
    proc = subprocess.run(
        [sys.executable, "-c", ENGINES], cwd=REPO, env=env(), capture_output=True, text=True, timeout=HANG_S
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = {
        tuple(line.split(" ", 2)[:2]): line.split(" ", 2)[2]
        for line in proc.stdout.splitlines()
        if line.startswith(("replicated-", "partitioned-"))
    }
    for mode, trained in (("tagi", "generator."), ("no_instruction", "bank.")):
        rep, part = f"replicated-{mode}", f"partitioned-{mode}"
        rep_losses = eval(out[(rep, "LOSSES")])  # noqa: S307  (a list of floats printed above)
        assert rep_losses[0] != rep_losses[-1]  # it trains
        assert rep_losses == pytest.approx(eval(out[(part, "LOSSES")]), rel=1e-5, abs=1e-6)  # noqa: S307
        # Replicated: no ZeRO-3 parameter, no DeepSpeed hook in the backbone, torch's own F.linear.
        assert out[(rep, "ZERO_PARAMS")].startswith("0 HOOKED 0 OF")
        assert out[(rep, "ZERO_PARAMS")].endswith("LINEAR linear")
        # Partitioned: every backbone parameter is ZeRO-3's, every module hooked, F.linear replaced
        # (memory_efficient_linear).
        zero, _, hooked, _, total, _, linear = out[(part, "ZERO_PARAMS")].split()
        assert int(zero) > 0 and int(hooked) == int(total) and linear == "zero3_linear_wrap"
        # The engine's module names its trainable parameters the same either way (what checkpoints hold).
        assert out[(rep, "KEYS")] == out[(part, "KEYS")] and trained in out[(rep, "KEYS")]
        assert "replicated, whole on each of 1 rank(s), outside ZeRO" in out[(rep, "LINE")]
        assert out[(rep, "CALLS")] == out[(part, "CALLS")] == "0"
        assert "train.frozen_backbone=partitioned" in out[(part, "LINE")]
    assert "shared LoRA" in out[("partitioned-no_instruction", "LINE")]  # kept whole, like the hypernetwork
