"""A random-init backbone is the same whether built plainly or partitioned under ZeRO-3."""

import subprocess
import sys

from tests.train.harness import HANG_S, REPO, env, partitioned_z3

SCRIPT = r"""
import sys, torch, deepspeed
from tagi_ds.runtime import dist, engine as E
from tagi_ds.recipes import get_recipe
from tagi_ds.model import build_backbone
dist.init()
cfg = get_recipe(sys.argv[1])
ds = E.inject(E.load_ds_json(sys.argv[2]), cfg, 1)
built = E.build_backbone(cfg, ds, {}, E.inference_placement(ds))
with E.backbone_init(ds):
    raw = build_backbone(cfg, {})  # zero.Init's own draw
torch.manual_seed(1234)  # the caller's RNG state must not matter
plain = dict(build_backbone(cfg, {}).named_parameters())
differs = 0
for (name, p), (_, q) in zip(built.named_parameters(), raw.named_parameters()):
    assert p.ds_numel == plain[name].numel() and p.numel() == 0, name  # really partitioned
    with deepspeed.zero.GatheredParameters([p, q]):
        assert torch.equal(p.data, plain[name].data), name
        differs += not torch.equal(q.data, plain[name].data)
print("SAME", differs)
"""


def test_zero3_random_init_equals_plain_build(tmp_path):
    ds = partitioned_z3(tmp_path)
    for recipe in ("tiny", "tiny-llama"):
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT, recipe, ds],
            cwd=REPO,
            env=env(),
            capture_output=True,
            text=True,
            timeout=HANG_S,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        same = next(ln for ln in proc.stdout.splitlines() if ln.startswith("SAME"))
        assert int(same.split()[1]) > 0  # without the copy, zero.Init's weights would differ
