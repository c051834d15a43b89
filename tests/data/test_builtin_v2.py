"""Built-in suite v2 (data.builtin_suite=v2): the Latin square, sizes, balance, and answers the SNI metric sees."""

from collections import Counter

import pytest

from tagi_ds.config import DataConfig
from tagi_ds.data.builtin import builtin_suite
from tagi_ds.data.builtin_v2 import FAMILIES, INSTANCES, SKILLS, VOCABS, builtin_suite_v2
from tagi_ds.data.spec import load_tasks
from tagi_ds.data.tokenizer import BUILTIN_MODEL, SentencePieceTokenizer
from tagi_ds.eval.metrics import normalize_answer, tokenize

SUITE = builtin_suite_v2(0)
SCORED = ("dev", "test")


def _pair(task):
    """(family, skill) of a v2 task name ``taskNNN_v2_<x>_<y>_<skill>``."""
    rest = task.name.split("_v2_", 1)[1]
    for x, y in FAMILIES:
        if rest.startswith(f"{x}_{y}_"):
            return (x, y), rest[len(x) + len(y) + 2 :]
    raise AssertionError(task.name)


def test_sizes_and_latin_square():
    assert len(FAMILIES) >= 8 and len(SKILLS) >= 16
    assert {k: len(v) for k, v in SUITE.items()} == {"train": 96, "dev": 16, "test": 16}
    for split in SCORED:  # per split: every family held out twice, every skill once
        pairs = [_pair(t) for t in SUITE[split]]
        assert Counter(f for f, _ in pairs) == dict.fromkeys(FAMILIES, 2)
        assert Counter(s for _, s in pairs) == dict.fromkeys(SKILLS, 1)
    train = [_pair(t) for t in SUITE["train"]]
    assert Counter(s for _, s in train) == dict.fromkeys(SKILLS, 6)  # each held-out skill is seen elsewhere
    assert all(len(t.instances) >= 100 and len(t.instances) == INSTANCES for ts in SUITE.values() for t in ts)


def test_splits_are_disjoint_in_tasks_pairs_and_names():
    names = [t.name for ts in SUITE.values() for t in ts]
    assert len(names) == len(set(names))
    pairs = {k: {_pair(t) for t in ts} for k, ts in SUITE.items()}
    assert not pairs["train"] & pairs["dev"] and not pairs["train"] & pairs["test"] and not pairs["dev"] & pairs["test"]
    defs = {k: {d for t in ts for d in t.definitions} for k, ts in SUITE.items()}
    assert not defs["train"] & defs["test"] and not defs["train"] & defs["dev"]


def test_every_scored_answer_survives_sni_normalisation_and_the_tokenizer_sees_it():
    tok = SentencePieceTokenizer(BUILTIN_MODEL)
    answers = {o for ts in SUITE.values() for t in ts for ex in t.instances for o in ex.outputs}
    for a in answers:
        assert normalize_answer(a) == a and tokenize(a, stem=False) == [a], a  # one lowercase [a-z] word
        assert len(tok.encode(a)) == 1, (a, tok.encode(a))  # one piece: nothing letter-level
    # Stemming never merges two different words of the suite (no plural / case variant hides in it).
    words = {w for v in VOCABS.values() for w in v.words} | {v.label for v in VOCABS.values()} | {"yes", "no"}
    stems = Counter(tokenize(w)[0] for w in words)
    assert all(n == 1 for n in stems.values()), [s for s, n in stems.items() if n > 1]
    assert not any(a.isdigit() or a != a.lower() for a in answers)


def test_two_way_answers_are_balanced_per_task():
    for ts in SUITE.values():
        for t in ts:
            _, skill = _pair(t)
            if SKILLS[skill].labels is not None:
                counts = Counter(ex.outputs[0] for ex in t.instances)
                assert len(counts) == 2 and set(counts.values()) == {INSTANCES // 2}, (t.name, counts)


def test_inputs_of_a_family_do_not_tell_its_tasks_apart():
    """Every task of a family draws five words, two or three from each vocabulary: the input never names the task."""
    for t in SUITE["train"][:16]:
        (x, y), _ = _pair(t)
        for ex in t.instances:
            words = ex.input.split()
            n_x = sum(w in VOCABS[x].words for w in words)
            assert len(words) == 5 and n_x in (2, 3) and all(w in VOCABS[x].words + VOCABS[y].words for w in words)


def test_deterministic_and_v1_unchanged_by_default():
    builtin_suite_v2.cache_clear()
    again = builtin_suite_v2(0)
    assert [(t.name, t.instances, t.definitions) for t in again["test"]] == [
        (t.name, t.instances, t.definitions) for t in SUITE["test"]
    ]
    assert builtin_suite_v2(1)["test"][0].instances != SUITE["test"][0].instances
    assert DataConfig().builtin_suite == "v1"
    v1 = load_tasks("builtin", DataConfig(), "test")
    assert [t.name for t in v1] == [t.name for t in builtin_suite(0)["test"]]
    v2 = load_tasks("builtin", DataConfig(builtin_suite="v2", max_instances_per_task=-1), "dev")
    assert [t.name for t in v2] == [t.name for t in SUITE["dev"]] and len(v2[0].instances) == INSTANCES


@pytest.mark.parametrize("split", SCORED)
def test_no_case_plural_letter_or_digit_skill_in_scored_splits(split):
    banned = ("upper", "capital", "plural", "letter", "spell", "vowel", "digit", "add", "sum", "multiply")
    for t in SUITE[split]:
        assert not any(b in t.name for b in banned), t.name
