"""The training step reads no tensor values back from the device (each read is a host sync on a GPU): the batch carries
host copies of its offsets and teacher rows, the adapters are validated from them, and every adapted layer adds its
delta into the base output in place, with the same values and gradients as the out-of-place sum."""

from __future__ import annotations

import sys

import pytest
import torch

from tagi_ds.adapters import AdapterSet, AdapterState, Site
from tagi_ds.adapters.layer import AdaptedLinear
from tagi_ds.ops import lora_delta
from tests.core.helpers import make_batch, tiny_model

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "benchmarks"))
from profile_train_step import HostReads  # noqa: E402  (the profiler's counter of host reads, by source line)


@pytest.mark.parametrize(
    "recipe, mode", [("tiny", "tagi"), ("tiny", "no_instruction"), ("tiny-llama", "tagi"), ("tiny-llama", "concat")]
)
def test_the_step_reads_no_tensor_value_from_tagi_code(recipe, mode):
    sets = {"hypernet": {"fusion": False}} if recipe == "tiny-llama" else {}
    model = tiny_model(recipe, mode=mode, teacher=mode == "tagi", **sets)
    torch.nn.init.normal_(next(iter(model.teacher.B.values())), std=0.1) if mode == "tagi" else None
    batch = make_batch("t5" if recipe == "tiny" else "llama", counts=(2, 3), teacher_rows=[1, 0]).to("cpu")
    reads = HostReads()
    with reads:
        loss, terms = model(batch)
        loss.backward()
        assert torch.tensor([1]).item() == 1  # the counter sees reads (this line's)
    ours = {
        site: n for site, n in reads.sites.items() if site.startswith("tagi_ds/") and "lora_delta_torch" not in site
    }  # the CPU reference op's own read (on a GPU: the Triton kernel)
    assert ours == {}, ours
    assert any("test_step_syncs.py" in site for site in reads.sites)
    if mode == "tagi":
        assert terms["kl"] > 0 and terms["param"] > 0


def test_a_moved_batch_keeps_host_copies_of_its_offsets_and_teacher_rows():
    batch = make_batch("t5", counts=(2, 3), teacher_rows=[1, 0])
    moved = batch.to("meta")  # values unreadable there: the host copies must answer
    assert moved.example_offsets.device.type == "meta"
    assert moved.offsets_list() == [0, 2, 5] and moved.teacher_rows_list() == [1, 0]
    assert batch.task_of_example.tolist() == [0, 0, 1, 1, 1]
    assert moved.task_of_example.shape == (5,)  # output_size given: no read of the counts


def test_adapter_sets_are_checked_from_host_offsets_and_share_token_offsets():
    A, B = torch.randn(2, 4, 6), torch.randn(2, 5, 4)
    on_meta = torch.tensor([0, 2, 5], device="meta")
    adapters = AdapterSet({0: (A, B)}, on_meta, 1.0, host_offsets=[0, 2, 5])
    assert adapters.num_examples == 5
    assert adapters.token_offsets(7) is adapters.token_offsets(7)  # made once per length
    with pytest.raises(ValueError, match="non-decreasing"):
        AdapterSet({0: (A, B)}, on_meta, 1.0, host_offsets=[0, 3, 2])
    with pytest.raises(ValueError, match="do not match"):
        AdapterSet({0: (A, B)}, on_meta, 1.0, host_offsets=[0, 5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_place_delta_equals_the_out_of_place_sum_with_the_same_gradients(dtype):
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5, dtype=dtype)
    state = AdapterState()
    layer = AdaptedLinear(base, Site(0, "w", "encoder", 0, "q", 6, 5), state)
    x = torch.randn(5, 3, 6, dtype=dtype, requires_grad=True)
    A = torch.randn(2, 4, 6, dtype=dtype, requires_grad=True)
    B = torch.randn(2, 5, 4, dtype=dtype, requires_grad=True)
    offsets = torch.tensor([0, 2, 5])
    with state.use(AdapterSet({0: (A, B)}, offsets, 0.5, "torch")):
        y = layer(x)
    ref = base(x) + lora_delta(x.reshape(-1, 6), A, B, offsets * 3, 0.5, "torch").view(5, 3, 5)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, A, B, base.weight), g)
    want = torch.autograd.grad(ref, (x, A, B, base.weight), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_the_shared_lora_runs_as_one_segment_with_the_values_of_k_copies():
    model = tiny_model("tiny", mode="no_instruction", teacher=False)
    for b in model.bank.B.values():
        torch.nn.init.normal_(b, std=0.2)
    batch = make_batch("t5", counts=(2, 3))
    one = model.bank_adapters(model.bank, batch, shared=True)
    a, _ = next(iter(one.factors.values()))
    assert a.shape[0] == 1 and one.example_offsets.tolist() == [0, 5]
    copies = model.bank.adapters(torch.zeros(2, dtype=torch.long), batch.example_offsets)
    got = model.logits(batch.input_ids, batch.attention_mask, batch.labels, one)
    want = model.logits(batch.input_ids, batch.attention_mask, batch.labels, copies)
    torch.testing.assert_close(got, want)
