"""Decoder-only families (Llama-3, Mistral, Qwen2.5, Gemma-2): recipes against the public configs, true per-site
shapes under GQA, the chunked LM-head loss against its specification, chat templates, PEFT export per family,
and every stage of the pipeline for each family on 2 ZeRO-3 CPU ranks (one launch)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

from tagi_ds import artifacts, backbones, families
from tagi_ds.batch import TaskBatch
from tagi_ds.config import ConfigError, apply_overrides
from tagi_ds.data import (
    DataError,
    Example,
    HFTokenizer,
    Segment,
    SentencePieceTokenizer,
    Task,
    TaskCollator,
    format_instance,
    format_instruction,
)
from tagi_ds.export.peft import condition_text, export_peft, generate_adapter, generate_factors, instruction_tensors
from tagi_ds.loss_terms import token_losses
from tagi_ds.losses import ce_loss, kl_loss
from tagi_ds.model import build_backbone, build_model
from tagi_ds.plan import count
from tagi_ds.recipes import get_recipe
from tests.backbones.families import ARCHS, write_checkpoint
from tests.core.helpers import perturb
from tests.train.harness import HANG_S, REPO, check, env, hang_limit, partitioned_z3, run_job

INSTRUCTION = "Reverse the order of the words, then write every word in uppercase."

# google/gemma-2-9b etc.: parameters (safetensors metadata) and (q, k, v, o, gate, up, down) as (d_in, d_out).
PUBLIC = {
    "llama3-8b": (8_030_261_248, 4096, 1024, 14336, 4096),
    "llama3.2-1b": (1_235_814_400, 2048, 512, 8192, 2048),
    "mistral-7b": (7_248_023_552, 4096, 1024, 14336, 4096),
    "qwen2.5-7b": (7_615_616_512, 3584, 512, 18944, 3584),
    "gemma2-9b": (9_241_705_984, 4096, 2048, 14336, 3584),
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_recipes_match_the_public_checkpoints_site_by_site(name):
    params, q_out, kv_out, d_ff, d = PUBLIC[name]
    cfg = apply_overrides(get_recipe(name), ["model.adapted=q,k,v,o,gate,up,down"])
    c = count(cfg, teacher_rows=2)
    assert c.backbone == params
    want = {
        "q": (d, q_out),
        "k": (d, kv_out),
        "v": (d, kv_out),
        "o": (q_out, d),
        "gate": (d, d_ff),
        "up": (d, d_ff),
        "down": (d_ff, d),
    }
    for _, layer, kind, d_in, d_out in c.sites:
        assert (d_in, d_out) == want[kind], (name, layer, kind)
    # One generator head group per projection shape: k and v (same shape) and gate and up still apart by kind.
    assert sorted((di, do) for _, di, do in c.groups) == sorted(want.values())
    assert c.teacher == 2 * 32 * sum(di + do for _, _, _, di, do in c.sites)  # the bank: true shapes, rank 32


def test_every_backbone_module_has_the_protocols_signatures():
    """What a family's record says its module provides, it provides, with the protocol's parameters in the
    protocol's order (the same for every family: no caller branches on which one it holds)."""
    for name, family in families.FAMILIES.items():
        module = backbones.get(name)
        for protocol, flag in backbones.PROTOCOLS:
            if flag is not None and not getattr(family, flag):
                continue
            for member in backbones.members(protocol):
                want = list(inspect.signature(getattr(protocol, member)).parameters)[1:]  # less self
                assert list(inspect.signature(getattr(module, member)).parameters) == want, (name, member)


def _tiny(arch: str):
    return apply_overrides(get_recipe(f"tiny-{arch}"), ["model.adapted=q,k,v,o,gate,up,down"])


@pytest.mark.parametrize("arch", ARCHS)
def test_head_of_the_final_states_is_the_family_forward(arch):
    torch.manual_seed(0)
    model = build_backbone(_tiny(arch)).eval()
    ids = torch.randint(4, 1000, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    module = backbones.get(arch)
    with torch.no_grad():
        states, head = module.head_inputs(model, ids, mask)
        want = module.logits(model, ids, mask)
    torch.testing.assert_close(head(states.flatten(0, 1)), want.flatten(0, 1), rtol=0, atol=1e-5)
    if arch == "gemma2":  # the final soft-capping is the head's (|logit| < 30)
        assert model.config.final_logit_softcapping == 30.0 and float(want.abs().max()) < 30.0


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_ce_and_kl_equal_the_reference_with_their_gradients(chunk):
    torch.manual_seed(0)
    head_w = torch.randn(97, 16) / 4
    head = lambda h: h @ head_w.T  # noqa: E731
    h_s = torch.randn(23, 16, requires_grad=True)
    h_t = torch.randn(23, 16)
    labels = torch.randint(0, 97, (23,))
    ce, kl = token_losses(head, h_s, labels, h_t, temperature=2.0, chunk=chunk)
    (ce + 0.5 * kl).backward()
    got = h_s.grad.clone()
    h_s.grad = None
    ref_ce, ref_kl = ce_loss(head(h_s), labels), kl_loss(head(h_s), head(h_t), 2.0)
    (ref_ce + 0.5 * ref_kl).backward()
    torch.testing.assert_close((ce, kl), (ref_ce, ref_kl), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, h_s.grad, rtol=1e-5, atol=1e-7)
    ce_only, none = token_losses(head, h_s, labels, chunk=chunk)
    assert none is None and torch.allclose(ce_only, ref_ce)


def test_training_loss_never_materialises_vocab_sized_logits_over_the_sequence():
    """The student and teacher forwards of a decoder-only step hold [tokens, V] only for target rows, a chunk at
    a time: no tensor with L x V elements (the prompt's positions) is ever allocated."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tests.core.helpers import make_batch, tiny_model

    model = tiny_model("tiny-qwen2", loss={"chunk_tokens": 4})
    batch = make_batch("llama", L=40, V=1024)
    V, N = model.cfg.model.vocab_size, int((batch.labels[:, 1:] != -100).sum())
    sizes = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            view = func._schema.returns[0].alias_info is not None  # e.g. the LM head's weight.t()
            if isinstance(out, torch.Tensor) and not view and out.dim() >= 2 and out.shape[-1] == V:
                sizes.append(out.shape[:-1].numel())
            return out

    with Sizes():
        loss, terms = model(batch)
        loss.backward()
    assert terms["kl"] > 0 and sizes and max(sizes) == 4 < N  # one chunk of 4 target rows at a time


def _checkpoints(root: Path) -> dict[str, Path]:
    return {arch: write_checkpoint(root / arch / "model", arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return _checkpoints(tmp_path_factory.mktemp("families"))


def _example_batch(tok, instr_ids, instr_mask) -> TaskBatch:
    """Three right-padded examples of one task: bos + prompt + target, -100 on the prompt."""
    rows, labels = [], []
    bos = [tok.bos_id] if tok.bos_id is not None else []
    for x, y in [("cat dog fish", "FISH DOG CAT"), ("red blue", "BLUE RED"), ("one two three four", "FOUR")]:
        xi, yi = bos + tok.encode(x), tok.encode(y) + [tok.eos_id]
        rows.append(xi + yi)
        labels.append([-100] * len(xi) + yi)
    L = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_id] * (L - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (L - len(r)) for r in labels])
    return TaskBatch(ids, mask, lab, torch.tensor([0, 3]), instr_ids, instr_mask)


def _tagi_and_peft_logits(model, tok, cfg, adapter: Path, instr_ids, instr_mask):
    import peft

    batch = _example_batch(tok, instr_ids, instr_mask)
    with torch.no_grad():
        adapters, _ = model.generate(batch)
        want = model.logits(batch.input_ids, batch.attention_mask, batch.labels, adapters, batch)
        bare = model.logits(batch.input_ids, batch.attention_mask, batch.labels, None)
        base = backbones.get(cfg.model.arch).build(cfg.model)
        loaded = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
        got = loaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    n_lora = sum(1 for n, _ in loaded.named_modules() if n.endswith(".lora_A.default"))
    return want, got, bare, n_lora


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_adapter_reproduces_tagi_logits(tmp_path, checkpoints, arch):
    pytest.importorskip("peft")
    cfg = apply_overrides(_tiny(arch), [f"model.model_name_or_path={checkpoints[arch]}"])
    tok = HFTokenizer(checkpoints[arch])
    model = build_model(cfg, "finetune", build_backbone(cfg)).eval()
    perturb(model)  # a generator whose deltas are not zero, as after training
    ids, mask = instruction_tensors(tok, cfg, condition_text(INSTRUCTION))
    out = export_peft(tmp_path / "adapter", model, generate_factors(model, ids, mask), str(checkpoints[arch]))
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    want, got, bare, n_lora = _tagi_and_peft_logits(model, tok, cfg, out, ids, mask)
    assert (want - bare).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert n_lora == len(model.sites) == 2 * 7  # every projection of both layers, nothing else


def test_chat_template_wraps_the_instruction_and_every_prompt(checkpoints):
    tok = HFTokenizer(checkpoints["llama"])
    task = Task(
        name="t",
        category="c",
        definitions=("Reverse the words.",),
        instances=(Example(id="t-0", input="cat dog", outputs=("dog cat",)),),
    )
    cfg = apply_overrides(_tiny("llama"), ["data.chat_template=true"]).data
    chat = TaskCollator([task], tok, cfg, arch="llama", input_view="concat", teacher_view=True)
    plain = TaskCollator([task], tok, apply_overrides(_tiny("llama"), []).data, arch="llama", input_view="concat")
    b, p = chat([Segment(0, (0,), 0)]), plain([Segment(0, (0,), 0)])
    render = lambda text, reply: tok.tok.apply_chat_template(  # noqa: E731
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=reply
    )
    decode = lambda ids: tok.tok.decode([i for i in ids.tolist()], skip_special_tokens=False)  # noqa: E731
    instruction = format_instruction(task)
    assert decode(b.instr_input_ids[0]) == render(instruction, False)  # bos + user turn, closed
    prompt = decode(b.input_ids[0][b.labels[0] == -100])
    assert prompt == render(instruction + format_instance("cat dog"), True)  # + the assistant turn opened
    assert decode(b.input_ids[0][b.labels[0] != -100]) == "dog cat<|eot_id|>"
    assert torch.equal(b.teacher_input_ids, b.input_ids)  # concat view = the teacher's view
    assert decode(p.input_ids[0]).startswith("<|begin_of_text|>Definition:")  # plain text when off
    with pytest.raises(DataError, match="data.chat_template=true but the tokenizer .* has no chat template"):
        TaskCollator([task], SentencePieceTokenizer(), cfg, arch="llama")


@pytest.mark.parametrize(
    "sets, match",
    [
        (["model.arch=gemma2", "model.attn_implementation=sdpa"], r"attn_implementation: Gemma-2 soft-caps.*\(sdpa\)"),
        (["model.sliding_window=8"], r"model.sliding_window: llama has no sliding-window.*\(8\)"),
        (
            ["model.arch=qwen2", "model.rope_scaling=8"],
            r"model.rope_scaling: Llama-3.1-style.*\(model.arch=qwen2\).*\(8\)",
        ),
    ],
)
def test_settings_a_family_cannot_honour_are_config_errors(sets, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(get_recipe("tiny-llama"), sets).validate()


def test_launcher_rejects_them_in_one_line_before_writing_anything(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launchers" / "pretrain.py"),
            "--recipe",
            "tiny-gemma2",
            "--output_dir",
            str(tmp_path / "run"),
            "--set",
            "model.attn_implementation=sdpa",
        ],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: model.attn_implementation: Gemma-2 soft-caps its attention logits, which sdpa cannot do; "
        "use eager or flash_attention_2 (sdpa)"
    ]
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_of_another_family_is_a_config_error(checkpoints):
    cfg = apply_overrides(get_recipe("tiny-llama"), [f"model.model_name_or_path={checkpoints['qwen2']}"])
    with pytest.raises(ConfigError, match="model_type 'qwen2' but model.arch is 'llama'.*model.arch=qwen2"):
        build_backbone(cfg)


@pytest.mark.distributed
def test_every_family_through_every_stage_on_two_ranks_then_peft(tmp_path, checkpoints):
    """teachers -> pretrain -> finetune -> evaluate for the 4 families in one 2-rank ZeRO-3 launch (every
    backbone parameter partitioned), llama and qwen2 with their chat template; then each trained hypernetwork's
    adapter exported to PEFT (launchers' generate_adapter path) gives tagi-ds's logits."""
    import shutil
    import sys

    for arch, path in checkpoints.items():
        shutil.copytree(path, tmp_path / arch / "model")
    chat = {"llama": True, "qwen2": True, "mistral": False, "gemma2": False}
    cmd = [
        sys.executable,
        "-m",
        "tagi_ds.launch",
        "--num_gpus",
        "2",
        str(REPO / "tests" / "backbones" / "pipeline.py"),
        str(tmp_path),
        partitioned_z3(tmp_path),
        *[f"{arch}:chat" if chat[arch] else arch for arch in ARCHS],
    ]
    proc = check(run_job(cmd, timeout=hang_limit(120)))  # the suite's longest launch: 16 stages, ~50-100 s
    print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("[pipeline]")))
    assert proc.stdout.count("parameters partitioned across 2 rank(s)") == 4 * 3  # training
    assert proc.stdout.count("0 small ones kept whole") == 4 * 3
    for arch in ARCHS:
        base = tmp_path / arch
        run = json.loads((base / "finetune" / "config.json").read_text())
        assert run["world_size"] == 2 and run["tagi"]["model"]["arch"] == arch
        assert run["tagi"]["data"]["chat_template"] is chat[arch]
        steps = [json.loads(line) for line in (base / "finetune" / "metrics.jsonl").read_text().splitlines()]
        assert len(steps) == 2 and all(s["kl"] > 0 and s["param"] > 0 and s["ce"] > 0 for s in steps)
        assert json.loads((base / "eval" / "config.json").read_text())["tagi"]["data"]["chat_template"] is chat[arch]
        results = json.loads((base / "eval" / "results.json").read_text())
        assert len(results["per_task"]) == 2 and (base / "eval" / "predictions.jsonl").read_text().count("\n") == 8

        cfg = artifacts.read_config(base / "finetune" / "hypernet")
        adapter = generate_adapter(
            cfg,
            base / "finetune" / "hypernet",
            INSTRUCTION,
            "task",
            base / "adapter",
            deepspeed=str(REPO / "ds_configs" / "z2.json"),
        )
        tok = HFTokenizer(base / "model")
        model = build_model(cfg, "finetune", build_backbone(cfg)).eval()
        artifacts.load_hypernet(model, base / "finetune" / "hypernet")
        ids, mask = instruction_tensors(tok, cfg, condition_text(INSTRUCTION))
        if chat[arch]:  # the hypernetwork read the instruction as a closed user turn
            assert tok.tok.decode(ids[0]).endswith(tok.chat_parts()[1])
        want, got, bare, _ = _tagi_and_peft_logits(model, tok, cfg, adapter, ids, mask)
        assert (want - bare).abs().max() > 0  # the trained generator makes non-zero deltas
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_checkpoint_run_describes_the_checkpoint_not_the_recipe(tmp_path, checkpoints):
    """--model_name_or_path fills the model's shape fields from the checkpoint's config.json (the planner, the saved
    configs and the tokenizer checks then see the model that loads), whatever shape the recipe had."""
    from tagi_ds.cli import resolve_config, training_parser

    for arch, path in checkpoints.items():
        hf = json.loads((path / "config.json").read_text())
        args = training_parser("pretrain", "").parse_args(
            [
                "--recipe",
                "llama3-8b" if arch == "llama" else f"tiny-{arch}",
                "--model_name_or_path",
                str(path),
                "--set",
                "model.d_model=8",
                "model.num_layers=9",
                f"model.arch={arch}",
                "hypernet.fusion=false",
            ]
        )
        m = resolve_config(args).model
        assert (m.d_model, m.num_layers, m.d_ff, m.vocab_size) == (
            hf["hidden_size"],
            hf["num_hidden_layers"],
            hf["intermediate_size"],
            hf["vocab_size"],
        ), arch
        assert m.num_kv_heads == hf["num_key_value_heads"] and m.num_heads == hf["num_attention_heads"]
    t5 = tmp_path / "t5"
    build_backbone(apply_overrides(get_recipe("tiny"), ["model.d_model=48", "model.num_layers=1"])).save_pretrained(t5)
    args = training_parser("pretrain", "").parse_args(["--model_name_or_path", str(t5)])
    m = resolve_config(args).model
    assert (m.d_model, m.num_layers, m.num_decoder_layers) == (48, 1, 2)
