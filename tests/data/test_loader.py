"""Sampling, sharding over ranks and exact resume of the loaders (2 ranks simulated in-process)."""

import json
from collections import Counter
from dataclasses import fields

import pytest
import torch

from tagi_ds.data.corpus import builtin_documents
from tagi_ds.data.loader import build_eval_loader, build_train_loader
from tagi_ds.data.sampler import TaskBatchSampler
from tagi_ds.data.spec import load_tasks
from tagi_ds.data.task import DataError
from tests.data.conftest import make_cfg


def assert_same(a, b):
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, f.name


def check_resume(build, split_at: int, more: int):
    """On each of 2 ranks: stop after ``split_at`` steps, save the state (as JSON), rebuild, resume, and
    compare the next ``more`` batches with an uninterrupted loader's."""
    for rank in (0, 1):
        ref = build(rank)
        expected = [next(ref) for _ in range(split_at + more)][split_at:]
        first = build(rank)
        for _ in range(split_at):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = build(rank)
        resumed.load_state_dict(state)
        for want in expected:
            assert_same(next(resumed), want)
        assert resumed.stats == ref.stats and resumed.epoch == ref.epoch


@pytest.mark.parametrize("stage", ["finetune", "teachers"])
def test_resume_task_loader_across_an_epoch_on_two_ranks(tok, stage):
    cfg = make_cfg("tiny", "data.max_instances_per_task=6")
    rows = {"task001_words_copy": 0}
    build = lambda rank: build_train_loader(cfg, tok, stage, rank=rank, world_size=2, teacher_rows=rows)
    steps = build(0).steps_per_epoch
    assert steps == 38  # 76 tasks x 2 groups / 2 per batch / 2 ranks
    check_resume(build, split_at=30, more=12)


def test_resume_pretrain_windows_on_two_ranks(tok):
    cfg = make_cfg("tiny", "data.pretrain_length=512")
    build = lambda rank: build_train_loader(cfg, tok, "pretrain", rank=rank, world_size=2)
    steps = build(0).steps_per_epoch
    check_resume(build, split_at=steps - 2, more=4)


def test_resume_streaming_corpus_on_two_ranks(tok, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = builtin_documents()[-120:]  # about 60 windows of 128 tokens: 3 rounds of 2 ranks x 8 windows
    (corpus / "a.txt").write_text("\n".join(docs[:60]) + "\n", encoding="utf-8")
    (corpus / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[60:]), encoding="utf-8")
    cfg = make_cfg("tiny", f"data.spec=text:{corpus}", "data.streaming=true", "data.pretrain_length=128")
    build = lambda rank: build_train_loader(cfg, tok, "pretrain", rank=rank, world_size=2)
    loader = build(0)
    names = [next(loader).task_names for _ in range(8)]
    rounds = next(i for i, n in enumerate(names) if n[0].startswith("window1."))
    assert rounds == 3 and loader.epoch == 2  # one step per round; then the next pass starts
    check_resume(build, split_at=2, more=3)  # resume inside pass 0, then cross into pass 1
    other = build(1)
    assert not {w for n in names for w in n} & {w for _ in range(8) for w in next(other).task_names}


def test_ranks_get_disjoint_batches_and_equal_steps():
    sizes = [8] * 10  # 20 groups of 4 -> 10 micro-batches of 2 groups
    samplers = [TaskBatchSampler(sizes, 2, 4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert [s.steps_per_epoch for s in samplers] == [5, 5]
    seen = Counter((seg.task, e) for s in samplers for plan in s.plans(0) for seg in plan for e in seg.examples)
    assert len(seen) == 80 and set(seen.values()) == {1}  # every example once per epoch, on one rank
    odd = [TaskBatchSampler([5, 3, 9, 2], 2, 4, seed=0, rank=r, world_size=3) for r in range(3)]
    assert len({s.steps_per_epoch for s in odd}) == 1
    for s in odd:
        for plan in s.plans(0):
            assert sum(len(seg.examples) for seg in plan) == 8 and len({seg.task for seg in plan}) == len(plan)


def test_sampler_is_deterministic_and_reshuffles_per_epoch():
    a = TaskBatchSampler([7] * 12, 2, 4, seed=1)
    b = TaskBatchSampler([7] * 12, 2, 4, seed=1)
    assert [next(a) for _ in range(20)] == [next(b) for _ in range(20)]
    assert a.plans(0) != a.plans(1) and a.plans(0) != TaskBatchSampler([7] * 12, 2, 4, seed=2).plans(0)


def test_resume_with_another_world_size_keeps_the_position():
    two = TaskBatchSampler([8] * 10, 2, 4, seed=0, rank=0, world_size=2)
    for _ in range(2):
        next(two)
    one = TaskBatchSampler([8] * 10, 2, 4, seed=0)
    one.load_state_dict(two.state_dict())
    assert one.step == 4 and next(one) == one.plans(0)[4]


def test_too_little_data_for_one_batch_per_rank():
    with pytest.raises(DataError, match="fewer than data.tasks_per_batch=2 x world_size=4"):
        TaskBatchSampler([4, 4, 4], 2, 4, seed=0, world_size=4)


def test_eval_loader_covers_every_instance_once_over_ranks(tok):
    cfg = make_cfg("tiny", "data.max_instances_per_task=7")
    tasks = load_tasks("builtin", cfg.data, "test")
    loaders = [build_eval_loader(cfg, tok, rank=r, world_size=2) for r in (0, 1)]
    assert len(loaders[0]) == len(loaders[1])
    ids = [i for loader in loaders for b in loader for i in b.example_ids]
    assert set(ids) == {ex.id for t in tasks for ex in t.instances}
    first = next(iter(loaders[0]))
    assert first.task_names[0] == tasks[0].name and first.example_ids[:2] == [ex.id for ex in tasks[0].instances[:2]]
