"""Core TAGI model properties on the tiny recipes (CPU)."""

import pytest
import torch

from tagi_ds.model import build_backbone
from tests.core.helpers import make_batch, tiny_cfg, tiny_model


def fresh_backbone(recipe, seed=0, **sets):
    torch.manual_seed(seed)
    return build_backbone(tiny_cfg(recipe, **sets))


@pytest.mark.parametrize("fusion", [False, True])
def test_t5_init_output_equals_frozen_backbone_exactly(fusion):
    model = tiny_model("tiny", hypernet={"fusion": fusion})
    ref = fresh_backbone("tiny", hypernet={"fusion": fusion})
    b = make_batch("t5")
    adapters, states = model.generate(b)
    got = model.logits(b.input_ids, b.attention_mask, b.labels, adapters, b, states)
    with torch.no_grad():
        enc = ref.get_encoder()(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
        mask = b.attention_mask
        if fusion:  # the fused decoder reads [instruction ; input] encodings of the plain backbone
            instr = ref.get_encoder()(input_ids=b.instr_input_ids, attention_mask=b.instr_attention_mask)
            per_ex = b.task_of_example
            enc = torch.cat([instr.last_hidden_state[per_ex], enc], 1)
            mask = torch.cat([b.instr_attention_mask[per_ex], mask], 1)
        want = ref(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=ref._shift_right(b.labels)).logits
    assert torch.equal(got, want)
    assert any(B.abs().sum() == 0 for _, B in adapters.factors.values())


def test_fusion_marker_is_added_to_the_instruction_states_and_trained():
    """hypernet.fusion_marker: a zero-initialised vector in the generator, added to every fused instruction
    state (not the input's); it changes nothing at init, receives gradients and is saved with the hypernet."""
    model = tiny_model("tiny", teacher=False, hypernet={"fusion_marker": True})
    plain = tiny_model("tiny", teacher=False, hypernet={"fusion_marker": False})
    assert "marker.vector" in model.generator.state_dict() and plain.generator.marker is None
    b = make_batch("t5")
    adapters, states = model.generate(b)
    at_init = model.logits(b.input_ids, b.attention_mask, b.labels, adapters, b, states)
    torch.testing.assert_close(
        at_init, plain.logits(b.input_ids, b.attention_mask, b.labels, adapters, b, states), rtol=0, atol=0
    )
    m = torch.randn(states.shape[-1])
    with torch.no_grad():
        model.generator.marker.vector.copy_(m)
    prefix, _ = model.fusion_prefix(b, states)
    torch.testing.assert_close(prefix, (states + m)[b.task_of_example])
    model.zero_grad()
    loss, _ = model(b)
    loss.backward()
    assert model.generator.marker.vector.grad is not None and model.generator.marker.vector.grad.abs().sum() > 0
    off = tiny_model("tiny", hypernet={"fusion_marker": True, "fusion": False})
    assert off.generator.marker is None  # without fusion there is nothing to mark


def _randomised(adapters, seed=3):
    """The same AdapterSet with every factor random (generated B factors start at zero)."""
    g = torch.Generator().manual_seed(seed)
    factors = {
        i: (torch.randn(A.shape, generator=g) * 0.3, torch.randn(B.shape, generator=g) * 0.3)
        for i, (A, B) in adapters.factors.items()
    }
    return type(adapters)(factors, adapters.example_offsets, adapters.scale, adapters.impl)


def _cross_kv_tokens(model):
    """Token rows each decoder layer's cross-attention k and v project, summed (forward hooks)."""
    seen = {"n": 0}
    handles = [
        m.register_forward_hook(
            lambda mod, args, out: seen.__setitem__("n", seen["n"] + args[0].shape[0] * args[0].shape[1])
        )
        for name, m in model.backbone.named_modules()
        if (".EncDecAttention.k" in name or ".EncDecAttention.v" in name) and isinstance(m, torch.nn.Linear)
    ]
    return seen, handles


def test_prefix_cache_projects_each_instruction_once_and_changes_no_logit():
    """At inference with fusion, the decoder's cross-attention keys/values of the instruction states are
    computed once per task (TagiModel.prefix_cache) instead of once per example: the logits and the greedy
    tokens equal the uncached path's (autograd on), with the task's adapters on the prefix (cross v is
    adapted in the tiny recipe), the fusion marker applied, and several tasks of unequal size."""
    from tagi_ds.eval.generate import generate_tokens, greedy_config

    model = tiny_model("tiny", teacher=False, hypernet={"fusion_marker": True})
    assert any(s.stack == "cross" and s.kind == "v" for s in model.sites)
    with torch.no_grad():
        model.generator.marker.vector.normal_()
    b = make_batch("t5", counts=(3, 1, 2))
    adapters, states = model.generate(b)
    adapters, states = _randomised(adapters), states.detach()
    seen, handles = _cross_kv_tokens(model)
    with torch.no_grad():
        cached = model.logits(b.input_ids, b.attention_mask, b.labels, adapters, b, states)
    n_cached, seen["n"] = seen["n"], 0
    plain = model.logits(b.input_ids, b.attention_mask, b.labels, adapters, b, states)  # autograd on: no cache
    n_plain = seen["n"]
    for h in handles:
        h.remove()
    torch.testing.assert_close(cached, plain.detach(), rtol=1e-5, atol=1e-5)
    B, L = b.input_ids.shape
    K, Li = b.instr_input_ids.shape
    layers = model.backbone.config.num_decoder_layers
    assert n_plain == 2 * layers * B * (Li + L)
    assert n_cached == 2 * layers * (K * Li + B * L)
    with torch.no_grad():
        assert tiny_model("tiny", hypernet={"fusion": False}).prefix_cache(b, states, adapters) is None

    gen = greedy_config(6, eos_id=1, pad_id=0, decoder_start_id=0)
    with torch.no_grad():
        fast = generate_tokens(model, b, adapters, states, gen)
    with torch.enable_grad():
        slow = generate_tokens(model, b, adapters, states, gen)
    assert torch.equal(fast, slow)


def test_llama_init_output_equals_frozen_backbone_exactly():
    model = tiny_model("tiny-llama")
    ref = fresh_backbone("tiny-llama")
    b = make_batch("llama")
    adapters, _ = model.generate(b)
    got = model.logits(b.input_ids, b.attention_mask, b.labels, adapters, b)
    with torch.no_grad():
        want = ref(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("recipe", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("pooling", ["mean", "first_last"])
def test_pooling_unchanged_by_extra_padding(recipe, pooling):
    model = tiny_model(recipe, hypernet={"pooling": pooling})
    b = make_batch(model.cfg.model.arch)
    _, pooled = model.encoder(b.instr_input_ids, b.instr_attention_mask)
    pad = 5
    ids = torch.cat([b.instr_input_ids, torch.zeros(b.num_tasks, pad, dtype=torch.long)], 1)
    mask = torch.cat([b.instr_attention_mask, torch.zeros(b.num_tasks, pad, dtype=torch.long)], 1)
    _, pooled_padded = model.encoder(ids, mask)
    torch.testing.assert_close(pooled_padded, pooled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", ["tiny", "tiny-llama"])
def test_only_hypernet_parameters_receive_gradients(recipe):
    model = tiny_model(recipe)
    b = make_batch(model.cfg.model.arch)
    loss, terms = model(b)
    loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got and all(n.startswith("generator.") for n in got)
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.teacher.parameters())
    assert {"ce", "kl", "param"} <= set(terms)


def test_teacher_bank_stays_outside_the_module_and_only_the_batch_rows_are_taken():
    """The frozen teacher is not a submodule (so DeepSpeed never partitions or gathers it): it keeps its own
    dtype when the module is cast, and a step copies exactly the batch's rows into the student's dtype."""
    model = tiny_model("tiny", rows=3)
    names = {n for n, _ in model.named_parameters()} | set(model.state_dict())
    assert names and not any("teacher" in n for n in names)
    assert {id(p) for p in model.teacher.parameters()}.isdisjoint(id(p) for p in model.parameters())
    torch.nn.init.normal_(model.teacher.B["0"], std=0.5)
    model = model.double()
    assert all(p.dtype == torch.float32 for p in model.teacher.parameters())
    b = make_batch("t5", counts=(2, 3), teacher_rows=[2, 0])
    loss, terms = model(b)
    assert terms["kl"] > 0 and terms["param"] > 0
    taken = model.teacher_adapters(b, model.generate(b)[0])
    for i, (a, bb) in taken.factors.items():
        assert a.dtype == torch.float64
        assert torch.equal(a, model.teacher.A[str(i)][[2, 0]].double())
        assert torch.equal(bb, model.teacher.B[str(i)][[2, 0]].double())
    with pytest.raises(ValueError, match="rows must be in"):
        model.teacher.take(torch.tensor([3]), b.example_offsets[:2], torch.device("cpu"), torch.float32)


def test_explicitly_trainable_backbone_parameters_get_gradients_and_checkpointing_matches():
    grads = {}
    for ckpt in (False, True):
        model = tiny_model(
            "tiny", model={"trainable": [r"encoder\.final_layer_norm"]}, hypernet={"checkpoint_encoder": ckpt}
        )
        loss, _ = model(make_batch("t5"))
        loss.backward()
        named = dict(model.named_parameters())
        assert named["backbone.encoder.final_layer_norm.weight"].grad is not None
        assert named["backbone.decoder.final_layer_norm.weight"].grad is None
        grads[ckpt] = {n: p.grad.clone() for n, p in named.items() if p.grad is not None}
    assert grads[False].keys() == grads[True].keys()
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recipe", ["tiny", "tiny-llama"])
def test_backbone_gradient_checkpointing_keeps_adapters_in_recompute(recipe):
    out = {}
    for ckpt in (False, True):
        model = tiny_model(recipe, model={"gradient_checkpointing": ckpt}, loss={"kl_weight": 0.0})
        model.train()
        # Nonzero B so the recomputed forward must see the generated adapters to match.
        for head in model.generator.head_B:
            torch.nn.init.normal_(head.weight, std=0.05, generator=torch.Generator().manual_seed(5))
        loss, _ = model(make_batch(model.cfg.model.arch))
        loss.backward()
        out[ckpt] = (loss.detach(), [p.grad.clone() for p in model.generator.parameters()])
    torch.testing.assert_close(out[True][0], out[False][0])
    for a, b in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recipe", ["tiny", "tiny-llama"])
@pytest.mark.parametrize(
    "stage, mode",
    [
        ("teachers", "tagi"),
        ("pretrain", "tagi"),
        ("finetune", "tagi"),
        ("finetune", "concat"),
        ("finetune", "no_instruction"),
    ],
)
def test_forward_backward_every_mode(recipe, stage, mode):
    model = tiny_model(recipe, stage=stage, mode=mode, teacher=stage == "finetune")
    loss, terms = model(make_batch(model.cfg.model.arch))
    assert torch.isfinite(loss)
    loss.backward()
    trained = [p for p in model.trainable_parameters()]
    assert trained and all(p.grad is not None for p in trained)
    assert all(p.grad is None for p in model.backbone.parameters())


def test_kl_term_positive_when_teacher_differs_and_zero_weight_skips_it():
    model = tiny_model("tiny")
    torch.nn.init.normal_(model.teacher.B["0"], std=0.5)
    _, terms = model(make_batch("t5"))
    assert terms["kl"].item() > 0
    model = tiny_model("tiny", loss={"kl_weight": 0.0, "param_weight": 0.0})
    _, terms = model(make_batch("t5"))
    assert set(terms) == {"ce"}


def test_teacher_bank_delta_equals_peft_lora():
    peft = pytest.importorskip("peft")
    model = tiny_model("tiny", stage="teachers", rows=2)
    bank = model.bank
    g = torch.Generator().manual_seed(7)
    for k in bank.B:
        bank.B[k].data.normal_(std=0.2, generator=g)
    b = make_batch("t5", counts=(2, 3), teacher_rows=[1, 0])
    with torch.no_grad():
        got = model.logits(b.input_ids, b.attention_mask, b.labels, model.bank_adapters(bank, b))
    for task, row in enumerate(b.teacher_index.tolist()):
        ref = fresh_backbone("tiny")
        lcfg = peft.LoraConfig(
            r=bank.rank, lora_alpha=bank.alpha, lora_dropout=0.0, target_modules=[s.name for s in model.sites]
        )
        pm = peft.get_peft_model(ref, lcfg)
        for s in model.sites:
            layer = pm.base_model.model.get_submodule(s.name)
            layer.lora_A["default"].weight.data.copy_(bank.A[str(s.index)][row])
            layer.lora_B["default"].weight.data.copy_(bank.B[str(s.index)][row])
        lo, hi = int(b.example_offsets[task]), int(b.example_offsets[task + 1])
        with torch.no_grad():
            want = pm(
                input_ids=b.input_ids[lo:hi],
                attention_mask=b.attention_mask[lo:hi],
                decoder_input_ids=ref._shift_right(b.labels[lo:hi]),
            ).logits
        torch.testing.assert_close(got[lo:hi], want, rtol=1e-5, atol=1e-5)


def test_hypernet_without_a_marker_loads_into_a_marker_model_exactly(tmp_path):
    """A hypernet saved before hypernet.fusion_marker loads with the marker at zero: the same outputs."""
    from tagi_ds import artifacts
    from tagi_ds.config import ConfigError

    old = tiny_model("tiny", teacher=False, seed=3)
    with torch.no_grad():
        for head in old.generator.head_B:
            head.weight.normal_(0, 0.05)
    artifacts.save_hypernet(old, tmp_path / "hn")
    new = tiny_model("tiny", teacher=False, seed=3, hypernet={"fusion_marker": True})
    with torch.no_grad():
        new.generator.marker.vector.fill_(1.0)
    artifacts.load_hypernet(new, tmp_path / "hn")
    assert new.generator.marker.vector.abs().sum() == 0
    b = make_batch("t5")
    with torch.no_grad():
        outs = []
        for m in (old, new):
            adapters, states = m.generate(b)
            outs.append(m.logits(b.input_ids, b.attention_mask, b.labels, adapters, b, states))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    other = tiny_model("tiny", teacher=False, hypernet={"rank": 4})
    with pytest.raises(ConfigError, match=r"generator tensor head_A.0.weight has shape \(1, 128, 512\), this model's"):
        artifacts.load_hypernet(other, tmp_path / "hn")


def test_a_hypernet_loaded_onto_other_backbone_weights_of_the_same_shape_warns_once(tmp_path, capsys):
    """The fingerprint saved with the generator tells two same-shaped backbones apart (here two random inits);
    the same backbone (also as bf16) and a hypernet saved before fingerprints existed load without a word."""
    import json

    from tagi_ds import artifacts

    trained = tiny_model("tiny", teacher=False)
    artifacts.save_hypernet(trained, tmp_path / "hn")
    saved = json.loads((tmp_path / "hn" / "config.json").read_text())["backbone_fingerprint"]
    assert saved == artifacts.backbone_fingerprint(trained)
    artifacts.load_hypernet(tiny_model("tiny", teacher=False), tmp_path / "hn")
    assert "warning" not in capsys.readouterr().out
    artifacts.load_hypernet(tiny_model("tiny", teacher=False).to(torch.bfloat16), tmp_path / "hn")
    assert "warning" not in capsys.readouterr().out  # bf16 of the same weights: the same backbone
    other = tiny_model("tiny", teacher=False, model={"init_seed": 12345})
    assert artifacts.backbone_fingerprint(other) != saved
    artifacts.load_hypernet(other, tmp_path / "hn")
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(
        f"warning: --hypernet {tmp_path / 'hn'}: trained against other "
        f"backbone weights (fingerprint {saved}, this backbone's "
    ), out
    assert "its adapters fit a built-in random init, not this backbone" in out[0]
    meta = json.loads((tmp_path / "hn" / "config.json").read_text())
    del meta["backbone_fingerprint"]  # written by an older version
    (tmp_path / "hn" / "config.json").write_text(json.dumps(meta))
    artifacts.load_hypernet(other, tmp_path / "hn")
    assert "warning" not in capsys.readouterr().out
    # training's finish and evaluation's load go through the mode's adapter source (stages.Generated): the same
    artifacts.save(trained, tmp_path / "via_source")
    assert json.loads((tmp_path / "via_source" / "config.json").read_text())["backbone_fingerprint"] == saved
    artifacts.load(other, tmp_path / "via_source")
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"warning: --hypernet {tmp_path / 'via_source'}: trained against "), out
