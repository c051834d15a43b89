"""Device placement: one mechanism (``engine.place``) puts every parameter and buffer on the engine's device.

The TAGI step crashed on CUDA under ZeRO-3 because DeepSpeed leaves module buffers where they were built: the
generator's site indices stayed on the CPU and indexed a CUDA embedding. These tests move models to the
``meta`` device through the mechanism (a device none of them starts on) and check that nothing is left
behind, and that building a ZeRO-3 engine applies it. A code-level rule keeps the step from building tensors
without a device.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tagi_ds.runtime.engine import place
from tests.core.helpers import tiny_model
from tests.train.harness import HANG_S, REPO, env

META = torch.device("meta")


def _left_behind(module: torch.nn.Module, device: torch.device) -> list[str]:
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return [name for name, t in tensors if t.device != device]


@pytest.mark.parametrize("recipe", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("mode", ["tagi", "concat"])
def test_place_leaves_no_parameter_or_buffer_elsewhere(recipe, mode):
    model = tiny_model(recipe, mode=mode, teacher=mode == "tagi")
    if mode == "tagi" or recipe == "tiny-llama":  # the generator's site indices; LLaMA's rotary frequencies
        assert any(True for _ in model.named_buffers()), "the test needs a model with buffers"
    assert _left_behind(model, META)  # everything starts elsewhere
    place(model, META)
    assert _left_behind(model, META) == []
    if mode == "tagi":  # the frozen teacher bank stays in host memory by design (not a submodule)
        assert all(p.device.type == "cpu" for p in model.teacher.parameters())


def test_place_skips_parameters_deepspeed_owns():
    lin = torch.nn.Linear(3, 3)
    lin.weight.ds_id = 0  # a ZeRO-3 parameter: its shard lives where DeepSpeed put it
    lin.register_buffer("idx", torch.arange(3))
    place(lin, META)
    assert lin.weight.device.type == "cpu" and lin.bias.device == META and lin.idx.device == META


ENGINE = r"""
import sys, torch
from tagi_ds.runtime import dist, engine as E
from tagi_ds.recipes import get_recipe
from tagi_ds.model import build_model
dist.init()
cfg = get_recipe("tiny")
ds = E.inject(E.load_ds_json(sys.argv[1]), cfg, 1)
placement = E.inference_placement(ds)
model = build_model(cfg, "finetune", E.build_backbone(cfg, ds, {}, placement), num_bank_rows=2, with_teacher=True)
calls, real = [], E.place
E.place = lambda m, d: calls.append((m is model, str(d))) or real(m, d)  # records, then does the real thing
eng = E.build_engine(model, cfg, ds, placement)
assert eng.zero_optimization_stage() == int(sys.argv[2])
print("CALLS", calls, "ENGINE", eng.device)
left = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
        if not hasattr(t, "ds_id") and t.device != eng.device]
print("LEFT", left)
"""


@pytest.mark.parametrize("config,stage", [("z3_tiny.json", 3), ("z2.json", 2)])
def test_building_the_engine_places_the_model_on_the_engine_device(config, stage):
    """A CPU machine has no second device to leave a buffer on, so this checks the wiring: every engine build
    hands the whole model to ``place`` with the engine's device (the meta tests above check ``place``)."""
    proc = subprocess.run(
        [sys.executable, "-c", ENGINE, str(REPO / "ds_configs" / config), str(stage)],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CALLS [(True, 'cpu')] ENGINE cpu" in proc.stdout and "LEFT []" in proc.stdout, proc.stdout[-2000:]


# -- the code-level rule ------------------------------------------------------------------------------------
STEP_CODE = [
    "tagi_ds/model.py",
    "tagi_ds/losses.py",
    "tagi_ds/ops.py",
    "tagi_ds/batch.py",
    "tagi_ds/adapters",
    "tagi_ds/hypernet",
    "tagi_ds/backbones",
]
FACTORIES = {
    "tensor",
    "as_tensor",
    "arange",
    "zeros",
    "ones",
    "full",
    "empty",
    "rand",
    "randn",
    "randint",
    "eye",
    "linspace",
}


def _violations(path: Path) -> list[str]:
    """Factory calls without ``device=`` outside ``__init__`` (modules built in ``__init__`` are moved by
    ``place``; a tensor built during the step must say where it goes)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []

    def visit(node, in_init):
        for child in ast.iter_child_nodes(node):
            init = in_init or (isinstance(child, ast.FunctionDef) and child.name == "__init__")
            if (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Attribute)
                and child.func.attr in FACTORIES
                and isinstance(child.func.value, ast.Name)
                and child.func.value.id == "torch"
                and not init
                and not any(k.arg == "device" for k in child.keywords)
            ):
                out.append(f"{path.relative_to(REPO)}:{child.lineno}: torch.{child.func.attr}(...) without device=")
            visit(child, init)

    visit(tree, False)
    return out


def test_no_tensor_is_built_in_the_step_without_an_explicit_device():
    files = [
        p for entry in STEP_CODE for p in ((REPO / entry).rglob("*.py") if (REPO / entry).is_dir() else [REPO / entry])
    ]
    assert len(files) > 8
    problems = [v for f in files for v in _violations(f)]
    assert problems == [], "\n".join(problems)
