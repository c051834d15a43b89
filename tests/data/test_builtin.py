"""The built-in instruction suite: size, shape, determinism, instruction-dependence, SNI round trip."""

import random
from collections import defaultdict

import numpy as np

from tagi_ds.config import DataConfig
from tagi_ds.data import builtin as bi
from tagi_ds.data.builtin import FAMILIES, SKILLS, builtin_suite, make_task, write_builtin
from tagi_ds.data.spec import load_tasks


def test_suite_size_categories_and_lengths():
    suite = builtin_suite(0)
    train, test = suite["train"], suite["test"]
    assert len(train) >= 60 and len(test) >= 20
    assert len({t.category for t in train}) >= 6
    assert {t.category for t in test} <= {t.category for t in train}
    for task in train + test:
        assert len(set(task.definitions)) == 3, task.name
        assert len(task.positives) >= 2 and task.negatives
        for ex in task.instances:
            assert 1 <= len(ex.input.split()) <= 20 and 1 <= len(ex.outputs[0].split()) <= 12, (task.name, ex)
    assert {len(t.instances) for t in train} == {bi.TRAIN_INSTANCES}
    assert {len(t.instances) for t in test} == {bi.TEST_INSTANCES}


def test_deterministic_from_seed():
    fresh = bi.builtin_suite.__wrapped__(0)  # bypass the cache
    assert fresh == builtin_suite(0)
    other = builtin_suite(1)
    assert [t.name for t in other["train"]] == [t.name for t in fresh["train"]]
    assert other["train"][0].instances != fresh["train"][0].instances


def test_held_out_tasks_are_new_chains_of_seen_skills():
    seen_skills = {s for _, skills, _ in bi.TRAIN for s in skills}
    train_chains = {(f, skills) for f, skills, _ in bi.TRAIN}
    train_defs = {d for t in builtin_suite(0)["train"] for d in t.definitions}
    for family, skills, _ in bi.TEST:
        assert (family, skills) not in train_chains
        # every held-out chain uses skills seen in training, except a few new variants of seen skills
        assert set(skills) <= seen_skills | {"about_food", "is_negative", "count_odd"}
    assert not train_defs & {d for t in builtin_suite(0)["test"] for d in t.definitions}


def test_dev_split_is_new_chains_disjoint_from_train_and_test():
    """The development tasks are chains of training skills that neither split has, loadable as split dev."""
    seen_skills = {s for _, skills, _ in bi.TRAIN for s in skills}
    other = {(f, skills) for f, skills, _ in bi.TRAIN + bi.TEST}
    for family, skills, _ in bi.DEV:
        assert (family, skills) not in other and len(skills) >= 2 and set(skills) <= seen_skills
    suite = builtin_suite(0)
    dev = suite["dev"]
    assert len({(f, s) for f, s, _ in bi.DEV}) == len(dev) >= 20
    assert not {t.name for t in dev} & {t.name for t in suite["train"] + suite["test"]}
    assert {len(t.instances) for t in dev} == {bi.TEST_INSTANCES}
    assert {t.category for t in dev} <= {t.category for t in suite["train"]}
    for task, (family, skills, _) in zip(dev, bi.DEV):
        assert task.name.endswith(f"_{family}_{'_then_'.join(skills)}")
        assert all(ex.outputs[0] == bi._apply(skills, ex.input.split()) for ex in task.instances)
    loaded = load_tasks("builtin", DataConfig(max_instances_per_task=5), "dev")
    assert [t.name for t in loaded] == [t.name for t in dev] and {len(t.instances) for t in loaded} == {5}


def test_tasks_of_a_family_differ_only_in_the_instruction():
    by_family = defaultdict(list)
    for family, skills, _ in bi.TRAIN:
        by_family[family].append(skills)
    rng = random.Random(0)
    for name, family in FAMILIES.items():
        chains = by_family[name]
        assert len(chains) >= 4, name
        # The same input gets different answers depending on the task: the input cannot tell the task.
        ambiguous = 0
        for _ in range(50):
            tokens = family.draw(rng)
            answers = {bi._apply(skills, tokens) for skills in chains}
            ambiguous += len(answers) >= 3
        assert ambiguous >= 45, name
    # Same input distribution: mean input length per task agrees across a family's tasks.
    tasks = [make_task(i, "words", skills, "x", 0, 400) for i, skills in enumerate(by_family["words"])]
    means = [np.mean([len(ex.input.split()) for ex in t.instances]) for t in tasks]
    assert max(means) - min(means) < 0.35


def test_every_skill_is_used_and_phrased():
    used = {s for _, skills, _ in bi.TRAIN + bi.TEST for s in skills}
    assert used == set(SKILLS)
    assert all(len(s.phrases) == 3 for s in SKILLS.values())


def test_round_trip_through_sni_layout(tmp_path):
    out = write_builtin(tmp_path / "suite", seed=0)
    cfg = DataConfig(spec=f"sni:{out}")
    suite = builtin_suite(0)
    assert tuple(load_tasks(cfg.spec, cfg, "train")) == suite["train"]
    assert tuple(load_tasks(cfg.spec, cfg, "test")) == suite["test"]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(files) == len(suite["train"]) + len(suite["test"]) + 3  # no temp files left behind
    first = (out / "tasks" / f"{suite['train'][0].name}.json").read_bytes()
    write_builtin(tmp_path / "again", seed=0)
    assert (tmp_path / "again" / "tasks" / f"{suite['train'][0].name}.json").read_bytes() == first
