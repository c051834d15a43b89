"""The frozen teacher bank: kept in the training dtype, rows taken through one staging buffer, allocated uninitialised
for benchmarks. (Pinning needs CUDA: here the staging buffer is pageable, the copy path is the same.)"""

import pytest
import torch

from tagi_ds.adapters import LoraBank
from tagi_ds.adapters.layer import Site
from tagi_ds.runtime import engine as E
from tests.core.helpers import make_batch, tiny_model

SITES = [Site(index=i, name=f"s{i}", stack="decoder", layer=i, kind="q", d_in=6 + i, d_out=5 - i) for i in range(3)]
CPU = torch.device("cpu")


def bank(seed=0, rows=5):
    torch.manual_seed(seed)
    b = LoraBank(SITES, rows, rank=4, alpha=8.0)
    for p in b.parameters():
        torch.nn.init.normal_(p)
    return b.requires_grad_(False)


def test_staged_rows_equal_the_direct_ones_bit_for_bit_and_survive_the_next_take():
    direct, staged = bank(), bank().keep(torch.float32, CPU, max_rows=3, staged=True)
    assert staged._staging is not None and staged._staging.numel() == 3 * staged._row_numel()
    offsets = torch.tensor([0, 2, 3, 5])
    first = staged.take([4, 0, 4], offsets, CPU, torch.float64)
    keep = {i: (a.clone(), b.clone()) for i, (a, b) in first.factors.items()}
    for rows in ([4, 0, 4], [1, 3], [2]):
        got = staged.take(rows, offsets[: len(rows) + 1], CPU, torch.float64).factors
        want = direct.take(rows, offsets[: len(rows) + 1], CPU, torch.float64).factors
        assert got.keys() == want.keys()
        for i in want:
            for g, w in zip(got[i], want[i]):
                assert g.dtype == torch.float64 and g.shape == w.shape and torch.equal(g, w)
    for i, (a, b) in first.factors.items():  # a later take refilled the buffer, not this step's tensors
        assert torch.equal(a, keep[i][0]) and torch.equal(b, keep[i][1])
    more = staged.take([0, 1, 2, 3], torch.tensor([0, 1, 2, 3, 4]), CPU, torch.float32).factors  # > max_rows: direct
    assert torch.equal(more[1][0], direct.A["1"][[0, 1, 2, 3]])


def test_keep_casts_to_the_training_dtype_and_engine_keeps_the_teacher_where_the_steps_run():
    b = bank().keep(torch.bfloat16, CPU, max_rows=2)
    assert {p.dtype for p in b.parameters()} == {torch.bfloat16} and b._staging is None  # CPU steps: no staging
    model = tiny_model("tiny", rows=3)
    home = E.keep_teacher(model, torch.bfloat16, CPU)
    assert {p.dtype for p in model.teacher.parameters()} == {torch.bfloat16}
    assert home == E.TeacherHome(CPU, "steps run on the cpu")
    batch = make_batch("t5", counts=(2, 3), teacher_rows=[2, 0])
    taken = model.teacher.take([2, 0], batch.example_offsets, CPU, torch.bfloat16)
    assert torch.equal(taken.factors[0][0], model.teacher.A["0"][[2, 0]])


def test_empty_init_draws_nothing_and_a_bad_init_is_named():
    state = torch.random.get_rng_state()
    b = LoraBank(SITES, 4, rank=2, alpha=2.0, init="empty")
    assert torch.equal(torch.random.get_rng_state(), state)  # peft's init would have drawn A
    assert b.A["2"].shape == (4, 2, 8) and b.B["2"].shape == (4, 3, 2)
    peft = LoraBank(SITES, 4, rank=2, alpha=2.0)
    assert all(torch.count_nonzero(p) == 0 for p in peft.B.values())
    with pytest.raises(ValueError, match="init must be one of peft, empty, got 'zeros'"):
        LoraBank(SITES, 4, rank=2, alpha=2.0, init="zeros")
