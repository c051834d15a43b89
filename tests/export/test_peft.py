"""PEFT export: a generated adapter loaded with peft onto the same backbone reproduces tagi-ds's logits."""

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, T5ForConditionalGeneration

from tagi_ds import artifacts
from tagi_ds.batch import TaskBatch
from tagi_ds.data import SentencePieceTokenizer
from tagi_ds.export.peft import condition_text, export_peft, generate_factors, instruction_tensors
from tagi_ds.model import build_backbone, build_model
from tests.core.helpers import perturb, tiny_cfg
from tests.train.harness import HANG_S, REPO, env

peft = pytest.importorskip("peft")
HF = {"tiny": T5ForConditionalGeneration, "tiny-llama": LlamaForCausalLM}
INSTRUCTION = "Reverse the order of the words, then write every word in uppercase."


def example_batch(tok, arch, instr_ids, instr_mask):
    """Three examples of one task; right-padded; T5 labels / LLaMA prompt+target with -100 on the prompt."""
    texts = [("cat dog fish", "FISH DOG CAT"), ("red blue", "BLUE RED"), ("one two three four", "FOUR")]
    rows, labels = [], []
    for x, y in texts:
        xi, yi = tok.encode(x), tok.encode(y) + [tok.eos_id]
        if arch == "t5":
            rows.append(xi + [tok.eos_id])
            labels.append(yi)
        else:
            rows.append([tok.bos_id] + xi + yi)
            labels.append([-100] * (1 + len(xi)) + yi)
    L, Lt = max(map(len, rows)), max(map(len, labels))
    ids = torch.tensor([r + [tok.pad_id] * (L - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
    width = Lt if arch == "t5" else L
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return TaskBatch(ids, mask, lab, torch.tensor([0, 3]), instr_ids, instr_mask)


@pytest.mark.parametrize("recipe", ["tiny", "tiny-llama"])
def test_peft_adapter_reproduces_tagi_logits(tmp_path, recipe):
    cfg = tiny_cfg(recipe, hypernet={"fusion": False})
    tok = SentencePieceTokenizer()
    torch.manual_seed(0)
    build_backbone(cfg).save_pretrained(tmp_path / "backbone")
    cls = HF[recipe]
    model = build_model(cfg, "finetune", cls.from_pretrained(tmp_path / "backbone")).eval()
    perturb(model)

    ids, mask = instruction_tensors(tok, cfg, condition_text(INSTRUCTION))
    factors = generate_factors(model, ids, mask)
    out = export_peft(tmp_path / "adapter", model, factors, str(tmp_path / "backbone"))
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tagi_adapter.json",
    ]
    state = load_file(str(out / "adapter_model.safetensors"))
    site = model.sites[0]
    A = state[f"base_model.model.{site.name}.lora_A.weight"]
    B = state[f"base_model.model.{site.name}.lora_B.weight"]
    assert A.shape == (cfg.hypernet.rank, site.d_in) and B.shape == (site.d_out, cfg.hypernet.rank)
    assert B.abs().max() > 0

    batch = example_batch(tok, cfg.model.arch, ids.expand(1, -1), mask)
    with torch.no_grad():
        adapters, states = model.generate(batch)
        want = model.logits(batch.input_ids, batch.attention_mask, batch.labels, adapters, batch, states)
        bare = model.logits(batch.input_ids, batch.attention_mask, batch.labels, None)
        loaded = peft.PeftModel.from_pretrained(cls.from_pretrained(tmp_path / "backbone"), str(out)).eval()
        kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if recipe == "tiny":
            kwargs["decoder_input_ids"] = loaded.get_base_model()._shift_right(batch.labels)
        got = loaded(**kwargs).logits
    assert (want - bare).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    lora_layers = [n for n, _ in loaded.named_modules() if n.endswith(".lora_A.default")]
    assert len(lora_layers) == len(model.sites)  # exactly the adapted sites, nothing else matched


def test_generate_adapter_launcher_writes_what_the_model_generates(tmp_path):
    cfg = tiny_cfg("tiny")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, "finetune", build_backbone(cfg))
    perturb(model)
    artifacts.save_hypernet(model, tmp_path / "hypernet")
    (tmp_path / "q.txt").write_text("Context: the cat sat on the mat. Question: where did the cat sit?\n")
    out = tmp_path / "adapter"
    # z2: no zero.Init, so the launcher's built-in backbone is the one built here (same seed).
    cmd = [
        sys.executable,
        str(REPO / "launchers" / "generate_adapter.py"),
        "--hypernet",
        str(tmp_path / "hypernet"),
        "--instruction_file",
        str(tmp_path / "q.txt"),
        "--condition",
        "instance",
        "--output_dir",
        str(out),
        "--deepspeed",
        str(REPO / "ds_configs" / "z2.json"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "omits the instruction fusion" in proc.stderr  # the tiny recipe fuses
    # weights readable by the group that shares the run directory, like every other file (safetensors writes 0600)
    umask = os.umask(0)
    os.umask(umask)
    for f in (tmp_path / "hypernet" / "generator.safetensors", out / "adapter_model.safetensors"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, (f, oct(f.stat().st_mode))
    meta = json.loads((out / "tagi_adapter.json").read_text())
    assert meta["condition"] == "instance" and meta["hypernet_input"].startswith("Context: the cat")
    assert meta["command"]["deepspeed"] == str(REPO / "ds_configs" / "z2.json")  # rundir.RunStart's command
    # written whole by atomic_dir: RunStart(directory=False) takes no run-dir lock and writes no config.json
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tagi_adapter.json",
    ]
    config = peft.PeftConfig.from_pretrained(str(out))
    assert (config.peft_type, config.task_type, config.r, config.lora_alpha) == ("LORA", "SEQ_2_SEQ_LM", 8, 16.0)
    tok = SentencePieceTokenizer()
    ids, mask = instruction_tensors(tok, cfg, meta["hypernet_input"])
    state = load_file(str(out / "adapter_model.safetensors"))
    for site, (A, B) in zip(model.sites, generate_factors(model, ids, mask)):
        torch.testing.assert_close(state[f"base_model.model.{site.name}.lora_A.weight"], A, rtol=0, atol=1e-6)
        torch.testing.assert_close(state[f"base_model.model.{site.name}.lora_B.weight"], B, rtol=0, atol=1e-6)
    # the task condition reads "Definition: ..." instead: a different adapter from the same text
    task_ids, task_mask = instruction_tensors(tok, cfg, condition_text(meta["text"], "task"))
    assert not torch.equal(generate_factors(model, task_ids, task_mask)[0][0], generate_factors(model, ids, mask)[0][0])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--hypernet", "/nonexistent/hn", "--instruction", "x"], "--hypernet '/nonexistent/hn': no such directory"),
        (["--hypernet", "{hn}", "--instruction", "  "], "the text is empty"),
        (["--hypernet", "{hn}", "--instruction_file", "/nonexistent/i.txt"], "--instruction_file '/nonexistent/i.txt'"),
        (["--hypernet", "{hn}", "--instruction", "x", "--mode", "concat"], "--mode concat: generate_adapter"),
    ],
)
def test_generate_adapter_bad_input_is_one_line(tmp_path, argv, message):
    from tests.eval.test_evaluate import run_main

    hn = tmp_path / "hn"
    hn.mkdir()
    (hn / "generator.safetensors").write_bytes(b"")
    (hn / "config.json").write_text("{}")
    err = run_main("generate_adapter.py", [a.replace("{hn}", str(hn)) for a in argv])
    assert message in err and "\n" not in err.strip()
