"""TaskBatch contents per stage, mode and architecture (the contract in tagi_ds/batch.py)."""

import pytest
import torch

from tagi_ds.data.corpus import split_abc
from tagi_ds.data.loader import build_eval_loader, build_train_loader
from tagi_ds.data.prompt import format_instance, format_instruction
from tagi_ds.data.spec import load_tasks, teacher_rows
from tests.data.conftest import make_cfg


def real(row, mask):
    return row[mask.bool()].tolist()


def labels_of(row):
    return [t for t in row.tolist() if t != -100]


def check_grouping(batch, tasks_by_name, k, m):
    offsets = batch.example_offsets
    assert offsets.dtype == torch.int64 and offsets[0] == 0 and offsets[-1] == batch.input_ids.shape[0] == k * m
    assert bool((offsets[1:] >= offsets[:-1]).all()) and batch.num_tasks == len(batch.task_names) <= k
    assert len(set(batch.task_names)) == batch.num_tasks  # one segment (and instruction) per task
    for t, name in enumerate(batch.task_names):
        ids = {ex.id for ex in tasks_by_name[name].instances}
        assert set(batch.example_ids[offsets[t] : offsets[t + 1]]) <= ids
        assert batch.categories[t] == tasks_by_name[name].category


@pytest.fixture(scope="module")
def tasks():
    cfg = make_cfg("tiny")
    return {t.name: t for t in load_tasks("builtin", cfg.data, "train")}


def test_t5_tagi_batch(tok, tasks):
    cfg = make_cfg("tiny", "data.setting=def_pos")
    loader = build_train_loader(cfg, tok, "finetune")
    for _ in range(3):
        b = next(loader)
        check_grouping(b, tasks, 2, 4)
        assert b.instr_input_ids.shape[0] == b.num_tasks and b.teacher_input_ids is None and b.teacher_index is None
        task_of = b.task_of_example.tolist()
        for i, ex_id in enumerate(b.example_ids):
            task = tasks[b.task_names[task_of[i]]]
            ex = next(e for e in task.instances if e.id == ex_id)
            assert real(b.input_ids[i], b.attention_mask[i]) == tok.encode(ex.input.strip()) + [tok.eos_id]
            assert labels_of(b.labels[i]) in [tok.encode(o) + [tok.eos_id] for o in ex.outputs]
        for t, name in enumerate(b.task_names):
            got = real(b.instr_input_ids[t], b.instr_attention_mask[t])
            options = [tok.encode(format_instruction(tasks[name], "def_pos", 2, d)) + [tok.eos_id] for d in range(3)]
            assert got in options and "Positive Example 2" in tok.decode(got)


def test_paraphrases_are_sampled_only_when_asked(tok, tasks):
    def definitions_seen(sample):
        loader = build_train_loader(make_cfg("tiny", f"data.sample_variants={sample}"), tok, "finetune")
        seen = set()
        for _ in range(60):
            b = next(loader)
            seen |= {tok.decode(b.instr_input_ids[t].tolist()) for t in range(b.num_tasks)}
        return {text.split(". ")[0] for text in seen}  # the family intro names the paraphrase

    assert len(definitions_seen(True)) > 6
    firsts = {format_instruction(t, "def", 2, 0).split(". ")[0].removesuffix("\n\n") for t in tasks.values()}
    assert definitions_seen(False) <= firsts


def test_llama_sequences_and_labels(tok, tasks):
    cfg = make_cfg("tiny-llama")
    b = next(build_train_loader(cfg, tok, "finetune"))
    check_grouping(b, tasks, 2, 4)
    assert b.labels.shape == b.input_ids.shape
    assert bool((b.input_ids[:, 0] == tok.bos_id).all()) and bool((b.instr_input_ids[:, 0] == tok.bos_id).all())
    for i in range(b.input_ids.shape[0]):
        mask = b.attention_mask[i].bool()
        assert not bool(mask[mask.sum() :].any())  # right padding
        lab = b.labels[i]
        assert bool((lab[~mask] == -100).all()) and bool((lab[lab != -100] == b.input_ids[i][lab != -100]).all())
        n_target = int((lab != -100).sum())
        assert lab[mask.sum() - 1] == tok.eos_id and bool((lab[: mask.sum() - n_target] == -100).all())


def test_llama_generation_batches_are_left_padded(tok):
    cfg = make_cfg("tiny-llama")
    b = next(iter(build_eval_loader(cfg, tok, generation=True)))
    assert bool((b.attention_mask[:, -1] == 1).all())  # left padding: every prompt ends at the last column
    for i in range(b.input_ids.shape[0]):
        row = real(b.input_ids[i], b.attention_mask[i])
        assert row[0] == tok.bos_id and tok.eos_id not in row
        assert labels_of(b.labels[i])[-1] == tok.eos_id


def test_concat_and_no_instruction_modes(tok, tasks):
    concat = next(build_train_loader(make_cfg("tiny", "mode=concat"), tok, "finetune"))
    plain = next(build_train_loader(make_cfg("tiny", "mode=no_instruction"), tok, "finetune"))
    assert concat.instr_input_ids is None and plain.instr_input_ids is None
    assert concat.example_ids == plain.example_ids  # same sampler, different views
    for i, ex_id in enumerate(concat.example_ids):
        task = tasks[concat.task_names[concat.task_of_example[i]]]
        ex = next(e for e in task.instances if e.id == ex_id)
        options = [
            tok.encode(format_instruction(task, "def", 2, d)) + tok.encode(format_instance(ex.input)) + [tok.eos_id]
            for d in range(3)
        ]  # one of the paraphrases, then the instance part
        assert real(concat.input_ids[i], concat.attention_mask[i]) in options
        assert real(plain.input_ids[i], plain.attention_mask[i]) == tok.encode(ex.input.strip()) + [tok.eos_id]


@pytest.mark.parametrize("arch", ["tiny", "tiny-llama"])
def test_teacher_views_and_index(tok, tasks, arch):
    rows = teacher_rows(list(tasks.values()), "task")
    b = next(build_train_loader(make_cfg(arch, "hypernet.fusion=false"), tok, "finetune", teacher_rows=rows))
    assert b.teacher_index.tolist() == [rows[n] for n in b.task_names]
    assert b.teacher_input_ids.shape[0] == b.input_ids.shape[0]
    for i in range(b.input_ids.shape[0]):
        assert labels_of(b.teacher_labels[i]) == labels_of(b.labels[i])  # same targets
        text = tok.decode(real(b.teacher_input_ids[i], b.teacher_attention_mask[i]))
        assert text.startswith("Definition:") and "Now complete the following example" in text
    no_kl = next(
        build_train_loader(
            make_cfg(arch, "loss.kl_weight=0", "hypernet.fusion=false"), tok, "finetune", teacher_rows=rows
        )
    )
    assert no_kl.teacher_input_ids is None and no_kl.teacher_index is not None
    cat_rows = teacher_rows(list(tasks.values()), "category")
    cfg = make_cfg(arch, "teacher.granularity=category", "hypernet.fusion=false")
    by_cat = next(build_train_loader(cfg, tok, "finetune", teacher_rows=cat_rows))
    assert by_cat.teacher_index.tolist() == [cat_rows[c] for c in by_cat.categories]


def test_teachers_stage_reads_instruction_and_input(tok, tasks):
    cfg = make_cfg("tiny", "teacher.granularity=category")
    b = next(build_train_loader(cfg, tok, "teachers"))
    rows = teacher_rows(list(tasks.values()), "category")
    assert b.instr_input_ids is None and b.teacher_input_ids is None
    assert b.teacher_index.tolist() == [rows[c] for c in b.categories]
    assert tok.decode(b.input_ids[0].tolist()).startswith("Definition:")


def test_truncation_is_counted(tok):
    cfg = make_cfg("tiny", "data.max_source_length=4", "data.max_target_length=2", "data.max_instruction_length=8")
    loader = build_train_loader(cfg, tok, "finetune")
    for _ in range(5):
        b = next(loader)
        assert b.input_ids.shape[1] <= 4 and b.labels.shape[1] <= 2 and b.instr_input_ids.shape[1] <= 8
    s = loader.stats
    assert s["examples"] == 40 and s["instructions"] >= 5
    assert s["truncated_instruction"] == s["instructions"] and 0 < s["truncated_input"] < 40
    assert 0 < s["truncated_target"] < 40 and "truncated: instruction" in loader.report()


@pytest.mark.parametrize("recipe", ["tiny", "tiny-llama"])
def test_pretrain_batches_split_windows(tok, recipe):
    cfg = make_cfg(recipe, "data.pretrain_length=40", "data.max_target_length=8", "data.max_source_length=16")
    loader = build_train_loader(cfg, tok, "pretrain")
    b = next(loader)
    B = cfg.data.tasks_per_batch * cfg.data.examples_per_task
    assert batch_shape_ok(b, B)
    for i, name in enumerate(b.task_names):
        window = loader.sampler.windows[int(name.removeprefix("window"))].tolist()
        a = real(b.instr_input_ids[i], b.instr_attention_mask[i])
        ids, lab = real(b.input_ids[i], b.attention_mask[i]), labels_of(b.labels[i])
        if recipe == "tiny":
            assert a[-1] == ids[-1] == lab[-1] == tok.eos_id
            parts = (a[:-1], ids[:-1], lab[:-1])
        else:
            assert a[0] == ids[0] == tok.bos_id and lab[-1] == tok.eos_id and ids[-1] == tok.eos_id
            n_c = len(lab) - 1
            parts = (a[1:], ids[1 : -1 - n_c], lab[:-1])
        assert all(parts) and sum(parts, []) == window
        assert len(parts[1]) <= 15 and len(parts[2]) <= 7


def batch_shape_ok(b, B):
    return (
        b.num_tasks == B
        and b.example_offsets.tolist() == list(range(B + 1))
        and b.instr_input_ids.shape[0] == B
        and b.categories == ["pretrain"] * B
    )


def test_split_abc_properties():
    tokens = list(range(100, 196))
    for v in range(300):
        a, b, c = split_abc(tokens, v, max_b=30, max_c=10)
        assert a and b and c and a + b + c == tokens and len(b) <= 30 and len(c) <= 10
        assert split_abc(tokens, v, 30, 10) == (a, b, c)
    lengths = {len(split_abc(tokens, v)[2]) for v in range(300)}
    assert len(lengths) > 40  # without budgets the cut points spread over the window
    with pytest.raises(ValueError):
        split_abc([1, 2], 0)
