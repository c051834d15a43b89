"""Precision on every path: RoPE frequencies in fp32, the generator and the teacher bank in the training dtype.

Each decoder family is built under ZeRO-3 with a real DeepSpeed bf16 engine (one gloo rank: enough, the casts are
per rank), with the frozen backbone partitioned and replicated (``train.frozen_backbone``). ``deepspeed.zero.Init``
casts every float tensor created in its context to bf16, RoPE's ``inv_freq`` included; transformers >= 5.2x guards
its RoPE builds against that (``prevent_arange_dtype_change``), the GPU image's 5.17 does not, so the script turns
the guard off to test what the GPU image runs. DeepSpeed casts the module it is given only when none of its
parameters is partitioned yet, so the generator used to train in fp32 with a partitioned backbone, in bf16 with a
replicated one.
"""

import json
import math
import subprocess
import sys

import torch

from tests.train.harness import REPO, env, partitioned_z3

SCRIPT = r"""
import contextlib, json, sys, torch
import transformers.modeling_utils as mu
if hasattr(mu, "prevent_arange_dtype_change"):
    mu.prevent_arange_dtype_change = contextlib.nullcontext  # as transformers 5.17 (the GPU image) builds RoPE
from tagi_ds.runtime import dist, engine as E
from tagi_ds.recipes import get_recipe
from tagi_ds.model import build_backbone
from tagi_ds import assembly, stages
dist.init()
out = []
for recipe in sys.argv[2:]:
    plain = {n: b for n, b in build_backbone(get_recipe(recipe)).named_buffers() if "inv_freq" in n}
    for placement in ("partitioned", "replicated"):
        cfg = get_recipe(recipe)
        cfg.train.frozen_backbone = placement
        ds = E.inject(E.load_ds_json(sys.argv[1]), cfg, 1)
        ds["bf16"] = {"enabled": True}  # the CPU accelerator runs bf16; the config refuses it without CUDA
        run = assembly.assemble(stages.spec("finetune", cfg), cfg, ds, {}, placement=E.Placement(placement, "test"),
                                rows=2, teacher=True)
        model, eng = run.model, run.runner
        backbone = model.backbone
        rope = {n: [str(b.dtype), torch.equal(b, plain[n])] for n, b in backbone.named_buffers() if "inv_freq" in n}
        gen = sorted({str(t.dtype) for p in model.generator.parameters()
                      for t in (p, getattr(p, "ds_tensor", p))})
        out.append({"recipe": recipe, "placement": placement, "rope": rope, "generator": gen,
                    "partitioned": any(hasattr(p, "ds_id") for p in backbone.parameters()),
                    "teacher": sorted({str(p.dtype) for p in model.teacher.parameters()})})
        eng.destroy()
# DeepSpeed's Muon module is imported with its functions eager (engine.import_muon_eager): torch's inductor
# compiler is not imported at an engine start (transformers imports torch._dynamo, and with it a part of inductor).
muon = sys.modules.get("deepspeed.runtime.zero.muon.original_muon")
newton_schulz = getattr(muon, "zeropower_via_newtonschulz5", None)
out.append({"inductor": "torch._inductor.compile_fx" in sys.modules,
            "eager": "absent" if newton_schulz is None else not hasattr(newton_schulz, "_torchdynamo_orig_callable")})
print("RESULT " + json.dumps(out))
"""

FAMILIES = ("tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gemma2")


def test_bf16_zero3_rope_fp32_and_generator_in_training_dtype(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, partitioned_z3(tmp_path), *FAMILIES],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )  # a hang guard: ~30 s idle
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    *rows, muon = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    if muon["eager"] != "absent":  # a DeepSpeed whose Muon module is laid out otherwise: nothing to check
        assert muon == {"inductor": False, "eager": True}, muon
    assert [(r["recipe"], r["placement"]) for r in rows] == [
        (f, p) for f in FAMILIES for p in ("partitioned", "replicated")
    ]
    for r in rows:
        where = f"{r['recipe']} {r['placement']}"
        assert r["partitioned"] == (r["placement"] == "partitioned"), where
        assert r["rope"] and all(n.endswith("inv_freq") for n in r["rope"]), where
        for name, (dtype, same) in r["rope"].items():
            assert dtype == "torch.float32" and same, f"{where}: {name} is {dtype} (same as a plain build: {same})"
        assert r["generator"] == ["torch.bfloat16"], f"{where}: generator {r['generator']}"
        assert r["teacher"] == ["torch.bfloat16"], f"{where}: teacher bank {r['teacher']}"


def test_cast_parameters_keeps_buffers_and_measure_uses_it(monkeypatch):
    """``plan.measure_step`` (and any whole-model cast) casts parameters, not buffers: RoPE stays fp32."""
    from tagi_ds.model import build_backbone
    from tagi_ds.plan import measure
    from tagi_ds.plan.inputs import PlanInput
    from tagi_ds.recipes import get_recipe
    from tagi_ds.runtime import engine as E

    backbone = E.cast_parameters(build_backbone(get_recipe("tiny-llama")), torch.bfloat16)
    assert {p.dtype for p in backbone.parameters()} == {torch.bfloat16}
    assert {b.dtype for n, b in backbone.named_buffers() if "inv_freq" in n} == {torch.float32}

    seen = []
    place = E.place
    monkeypatch.setattr(E, "place", lambda m, d: seen.append(m) or place(m, d))
    measure.measure_step(
        PlanInput(
            model="tiny-llama",
            stage="none",
            gpus_per_node=1,
            precision="bf16",
            micro_batch=2,
            examples_per_task=1,
            seq_len=8,
            target_len=4,
            instr_len=8,
            teacher_rows=2,
        ),
        device="cpu",
    )
    (model,) = seen
    assert {p.dtype for p in model.trainable_parameters()} == {torch.bfloat16}
    rope = {n: b for n, b in model.backbone.named_buffers() if "inv_freq" in n}
    assert rope and all(b.dtype == torch.float32 for b in rope.values())
    assert {p.dtype for p in model.teacher.parameters()} == {torch.bfloat16}


def test_bf16_rope_phase_error_is_what_the_fix_avoids():
    """Why it matters: llama-7b's RoPE (head_dim 128, theta 1e4) with bf16 frequencies is off by > 1 rad at
    position 1152 (the phases are position * inv_freq, computed in fp32 from the buffer)."""
    inv = 1.0 / (10000.0 ** (torch.arange(0, 128, 2, dtype=torch.float) / 128))
    err = ((1152 * inv.bfloat16().float() - 1152 * inv).abs().max()).item()
    assert 1.0 < err < math.pi
