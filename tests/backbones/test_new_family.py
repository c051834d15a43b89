"""A Llama-like family added from its record alone, as docs/architecture.md says to add one.

Qwen3 (transformers' ``Qwen3ForCausalLM``: Llama's module layout, with RMSNorm on each head's queries and keys) is
not one of the built-in families. Here it is one ``families.decoder_family`` record and a tiny recipe, registered
inside the test; no file of the package changes. It then goes through every stage: the config's checks, the
planner's counts, teachers -> pretrain -> finetune -> evaluate on 2 ZeRO-3 CPU ranks (tests/backbones/pipeline.py;
each rank registers it with ``--register``), and the PEFT export of the trained hypernetwork (preflight included).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tagi_ds import backbones, families, recipes
from tagi_ds.config import ConfigError, apply_overrides
from tagi_ds.recipes import get_recipe
from tests.backbones.families import SPECIALS, write_checkpoint
from tests.train.harness import REPO, check, hang_limit, partitioned_z3, run_job

QWEN3 = families.decoder_family(
    "qwen3",
    "Qwen3",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    constants={"rms_norm_eps": 1e-6},
    sliding_window=True,
    window_switch="use_sliding_window",
)
TINY = {
    "model": {
        "arch": "qwen3",
        "vocab_size": 1024,
        "d_model": 64,
        "d_ff": 128,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "sliding_window": 16,
        "adapted_stacks": ["decoder"],
    },
    "hypernet": {"fusion": False},
    "train": {"lr": 3e-3, "max_steps": 60, "save_steps": 30},
}


def register() -> None:
    """What each rank runs first: ``pipeline.py ... --register tests.backbones.test_new_family:register``."""
    families.register(QWEN3)
    recipes.RECIPES["tiny-qwen3"] = TINY


@pytest.fixture
def qwen3(monkeypatch):
    """Qwen3 registered for one test: the registry and the recipes are as they were afterwards."""
    monkeypatch.setitem(recipes.RECIPES, "tiny-qwen3", TINY)
    monkeypatch.setitem(SPECIALS, "qwen3", SPECIALS["qwen2"])  # the test tokenizer: Qwen's special tokens, template
    with families.registered(QWEN3):
        yield QWEN3


def test_a_family_is_a_config_error_until_its_record_is_registered():
    bad = apply_overrides(get_recipe("tiny-llama"), ["model.arch=qwen3"])
    with pytest.raises(ConfigError, match=r"^model.arch: must be one of t5, llama, mistral, qwen2, gemma2 \('qwen3'\)"):
        bad.validate()


def test_a_record_must_name_a_module_that_provides_what_it_claims(monkeypatch):
    fusing = families.decoder_family("fusing-llama", "F", "LlamaConfig", "LlamaForCausalLM", fusion=True)
    monkeypatch.setitem(families.FAMILIES, fusing.name, fusing)
    with pytest.raises(
        TypeError,
        match=r"tagi_ds.backbones.decoder \(model.arch=fusing-llama\) lacks fuse of "
        r"tagi_ds.backbones.Fusing",
    ):
        backbones.get("fusing-llama")


@pytest.mark.distributed
def test_a_family_from_its_record_alone_runs_every_stage_on_two_ranks(tmp_path, qwen3):
    from tagi_ds import artifacts
    from tagi_ds.data import HFTokenizer
    from tagi_ds.export.peft import condition_text, generate_adapter, instruction_tensors
    from tagi_ds.model import build_backbone, build_model
    from tagi_ds.plan import count
    from tests.backbones.test_families import INSTRUCTION, _tagi_and_peft_logits

    # config: the record's capabilities are the checks (a sliding window: yes; Llama-3.1 RoPE scaling: no)
    cfg = get_recipe("tiny-qwen3").validate()
    assert "qwen3" in families.having("sliding_window")
    with pytest.raises(ConfigError, match=r"rope_scaling: .* for model.arch=llama only \(model.arch=qwen3\)"):
        apply_overrides(cfg, ["model.rope_scaling=8"]).validate()
    # the planner: every projection's true shape under GQA (4 query heads, 2 key-value heads of 16)
    c = count(apply_overrides(cfg, ["model.adapted=q,k,v,o,gate,up,down"]), teacher_rows=2)
    want = {
        "q": (64, 64),
        "k": (64, 32),
        "v": (64, 32),
        "o": (64, 64),
        "gate": (64, 128),
        "up": (64, 128),
        "down": (128, 64),
    }
    assert not c.encoder_decoder and {kind: (di, do) for _, _, kind, di, do in c.sites} == want
    assert c.backbone == sum(p.numel() for p in build_backbone(cfg).parameters())

    model_dir = write_checkpoint(tmp_path / "qwen3" / "model", "qwen3")
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "qwen3"
    cmd = [
        sys.executable,
        "-m",
        "tagi_ds.launch",
        "--num_gpus",
        "2",
        str(REPO / "tests" / "backbones" / "pipeline.py"),
        str(tmp_path),
        partitioned_z3(tmp_path),
        "qwen3:chat",
        "--register",
        f"{__name__}:register",
    ]
    proc = check(run_job(cmd, timeout=hang_limit(40)))
    print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("[pipeline]")))
    assert proc.stdout.count("parameters partitioned across 2 rank(s)") == 3  # teachers, pretrain, finetune
    base = tmp_path / "qwen3"
    run = json.loads((base / "finetune" / "config.json").read_text())
    assert run["world_size"] == 2 and run["tagi"]["model"]["arch"] == "qwen3"
    steps = [json.loads(line) for line in (base / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(s["kl"] > 0 and s["param"] > 0 and s["ce"] > 0 for s in steps)
    results = json.loads((base / "eval" / "results.json").read_text())
    assert len(results["per_task"]) == 2 and (base / "eval" / "predictions.jsonl").read_text().count("\n") == 8

    # export: the launcher's path (preflight of the checkpoint, then the adapter), which PEFT loads as tagi-ds runs it
    cfg = artifacts.read_config(base / "finetune" / "hypernet")
    adapter = generate_adapter(
        cfg,
        base / "finetune" / "hypernet",
        INSTRUCTION,
        "task",
        base / "adapter",
        deepspeed=str(REPO / "ds_configs" / "z2.json"),
    )
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == QWEN3.peft_task_type
    tok = HFTokenizer(base / "model")
    model = build_model(cfg, "finetune", build_backbone(cfg)).eval()
    artifacts.load_hypernet(model, base / "finetune" / "hypernet")
    ids, mask = instruction_tensors(tok, cfg, condition_text(INSTRUCTION))
    want, got, bare, n_lora = _tagi_and_peft_logits(model, tok, cfg, adapter, ids, mask)
    assert (want - bare).abs().max() > 0 and n_lora == len(model.sites) == 2 * 2  # q and v of both layers
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
