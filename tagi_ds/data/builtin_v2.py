"""Built-in suite v2 (``data.builtin_suite=v2``): single-answer selection tasks the SNI metric can see.

Why a second suite (issue 25): on v1 the SNI normalisation lowercases and ROUGE-L stems, so a held-out
"X then uppercase / capitalize / plural" task scores exactly as the seen skill X, and letter-level and
multi-digit skills sit near 0 for every method; most of v1's held-out signal is then blind or noise.

v2 keeps only what the metric and the 1024-piece tokenizer see. Every input is five words drawn from a
*family*'s two vocabularies (two or three from each, in random order), e.g. animals and foods; every answer is
one word that is its own SNI normal form (lowercase ``[a-z]``, one sentencepiece each): a word of the input, a
vocabulary's label (``animal``), ``yes`` / ``no``, or ``two`` / ``three``. No case, plural, letter-level or
multi-digit skill exists in it. All 16 skills apply to every family, and all tasks of a family share its input
distribution, so the input never tells which task it is: only the instruction does.

Splits (a Latin square over family i and skill j, 8 families x 16 skills = 128 tasks):

- ``test``  (j - i) mod 8 == 0: 16 held-out pairs, two per family and one per skill row of the square;
- ``dev``   (j - i) mod 8 == 1: 16 more held-out pairs, for tuning and the reproduction's gates;
- ``train`` the other 96 pairs.

Every skill is trained on 6 of the 8 families and every family with 12 of the 16 skills, so a held-out task
is a *new combination* of a seen skill and a seen family: it tests whether the generated adapter composes
what the instruction says (the skill) with what the input is (the family), which an instruction-blind model
cannot (it sees the same inputs under 16 different tasks). Binary and two-way answers (yes/no, a label,
two/three) are balanced within each task: a majority-class guess scores 50 EM. Every task has 100 instances
in every split. EM is the primary metric (one-word answers: ROUGE-L equals EM up to stemming).
Deterministic from the seed (``random.Random`` seeded with strings).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass

from tagi_ds.data.builtin import ANIMALS, COLORS, FOODS, NEGATIVE, OBJECTS, POSITIVE
from tagi_ds.data.task import Demo, Example, Task

INSTANCES, NUM_POSITIVES, INPUT_WORDS = 100, 3, 5
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")


@dataclass(frozen=True)
class Vocab:
    """A word list with its label (a one-word answer) and the noun phrase the instructions use."""

    label: str
    noun: str
    words: tuple[str, ...]

    @property
    def a_noun(self) -> str:
        return ("an " if self.noun[0] in "aeiou" else "a ") + self.noun


VOCABS = {
    "animal": Vocab("animal", "animal", ANIMALS),
    "food": Vocab("food", "food", FOODS),
    "object": Vocab("object", "object", OBJECTS),
    "color": Vocab("color", "color", COLORS),
    "number": Vocab("number", "number word", NUMBERS),
    "positive": Vocab("positive", "positive word", POSITIVE),
    "negative": Vocab("negative", "negative word", NEGATIVE),
}
# Eight families, each a pair of vocabularies (x, y); no word is in both of a pair.
FAMILIES = (
    ("animal", "food"),
    ("animal", "object"),
    ("food", "color"),
    ("object", "color"),
    ("color", "number"),
    ("number", "animal"),
    ("positive", "negative"),
    ("food", "object"),
)


def family_name(x: str, y: str) -> str:
    return f"{x}_{y}"


@dataclass(frozen=True)
class Skill:
    """``fn(words, is_x, x_label, y_label) -> answer``; ``labels(x_label, y_label)``: the answer set of a
    two-way skill (balanced per task), or None for a selection; three phrasings with {x}/{y} nouns."""

    fn: Callable[[list[str], list[bool], str, str], str]
    phrases: tuple[str, str, str]
    labels: Callable[[str, str], tuple[str, str]] | None = None
    category: str = "Selection"


def _nth(xs: list[str], flags: list[bool], want: bool, n: int) -> str:
    return [w for w, f in zip(xs, flags) if f == want][n]


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


_YES_NO = lambda x, y: ("yes", "no")
_KINDS = lambda x, y: (x, y)
_TYPED, _CMP, _CLS = "Typed Selection", "Comparison", "Classification"

SKILLS: dict[str, Skill] = {
    "first_word": Skill(
        lambda w, f, x, y: w[0],
        ("give the first word", "write only the word that comes first", "return the word at the start of the list"),
    ),
    "last_word": Skill(
        lambda w, f, x, y: w[-1],
        ("give the last word", "write only the word that comes last", "return the word at the end of the list"),
    ),
    "middle_word": Skill(
        lambda w, f, x, y: w[2],
        ("give the middle word", "write only the third of the five words", "return the word in the center of the list"),
    ),
    "first_x": Skill(
        lambda w, f, x, y: _nth(w, f, True, 0),
        ("give the first {x}", "write the {x} that comes first", "return the earliest {x} in the list"),
        category=_TYPED,
    ),
    "last_x": Skill(
        lambda w, f, x, y: _nth(w, f, True, -1),
        ("give the last {x}", "write the {x} that comes last", "return the final {x} in the list"),
        category=_TYPED,
    ),
    "second_x": Skill(
        lambda w, f, x, y: _nth(w, f, True, 1),
        ("give the second {x}", "write {x} number two", "return the {x} that comes after the first {x}"),
        category=_TYPED,
    ),
    "first_y": Skill(
        lambda w, f, x, y: _nth(w, f, False, 0),
        ("give the first {y}", "write the {y} that comes first", "return the earliest {y} in the list"),
        category=_TYPED,
    ),
    "last_y": Skill(
        lambda w, f, x, y: _nth(w, f, False, -1),
        ("give the last {y}", "write the {y} that comes last", "return the final {y} in the list"),
        category=_TYPED,
    ),
    "second_y": Skill(
        lambda w, f, x, y: _nth(w, f, False, 1),
        ("give the second {y}", "write {y} number two", "return the {y} that comes after the first {y}"),
        category=_TYPED,
    ),
    "more_x": Skill(
        lambda w, f, x, y: _yes(sum(f) > len(f) - sum(f)),
        (
            "answer yes if there are more {x}s than {y}s, otherwise no",
            "say yes when the {x}s outnumber the {y}s and no when they do not",
            "reply yes or no: are most of the words {x}s?",
        ),
        _YES_NO,
        _CMP,
    ),
    "starts_x": Skill(
        lambda w, f, x, y: _yes(f[0]),
        (
            "answer yes if the first word is {ax}, otherwise no",
            "say yes when the list starts with {ax} and no otherwise",
            "reply yes or no: is the first word {ax}?",
        ),
        _YES_NO,
        _CMP,
    ),
    "ends_x": Skill(
        lambda w, f, x, y: _yes(f[-1]),
        (
            "answer yes if the last word is {ax}, otherwise no",
            "say yes when the list ends with {ax} and no otherwise",
            "reply yes or no: is the last word {ax}?",
        ),
        _YES_NO,
        _CMP,
    ),
    "first_kind": Skill(
        lambda w, f, x, y: x if f[0] else y,
        (
            "say whether the first word is {ax} or {ay}: answer {xl} or {yl}",
            "classify the first word as {xl} or {yl}",
            "answer {xl} or {yl} for the first word",
        ),
        _KINDS,
        _CLS,
    ),
    "last_kind": Skill(
        lambda w, f, x, y: x if f[-1] else y,
        (
            "say whether the last word is {ax} or {ay}: answer {xl} or {yl}",
            "classify the last word as {xl} or {yl}",
            "answer {xl} or {yl} for the last word",
        ),
        _KINDS,
        _CLS,
    ),
    "majority_kind": Skill(
        lambda w, f, x, y: x if sum(f) > len(f) - sum(f) else y,
        (
            "say which kind of word is more frequent: answer {xl} or {yl}",
            "classify the list by its majority as {xl} or {yl}",
            "answer {xl} if most words are {x}s and {yl} if most are {y}s",
        ),
        _KINDS,
        _CLS,
    ),
    "count_x": Skill(
        lambda w, f, x, y: "two" if sum(f) == 2 else "three",
        (
            "say how many {x}s there are: answer two or three",
            "count the {x}s, answering two or three",
            "give the number of {x}s as a word, two or three",
        ),
        lambda x, y: ("two", "three"),
        _CMP,
    ),
}
SKILL_NAMES = tuple(SKILLS)
INTROS = (
    "You are given five words; some are {x}s and the others are {y}s.",
    "The input is a list of five words, each of them {ax} or {ay}.",
    "In this task you receive five words, a mix of {x}s and {y}s.",
)


def split_of(family: int, skill: int) -> str:
    """The Latin square: ``test`` where (skill - family) mod 8 == 0, ``dev`` where it is 1, else ``train``."""
    r = (skill - family) % len(FAMILIES)
    return "test" if r == 0 else "dev" if r == 1 else "train"


def _draw(rng: random.Random, x: Vocab, y: Vocab) -> tuple[list[str], list[bool]]:
    n_x = rng.choice((2, 3))
    words = [(w, True) for w in rng.sample(x.words, n_x)] + [(w, False) for w in rng.sample(y.words, INPUT_WORDS - n_x)]
    rng.shuffle(words)
    return [w for w, _ in words], [f for _, f in words]


def _definition(x: Vocab, y: Vocab, skill: Skill, variant: int) -> str:
    fill = {"x": x.noun, "y": y.noun, "xl": x.label, "yl": y.label, "ax": x.a_noun, "ay": y.a_noun}
    body = skill.phrases[variant].format(**fill)
    return f"{INTROS[variant].format(**fill)} {body[0].upper()}{body[1:]}{'' if body.endswith('?') else '.'}"


def make_task(number: int, fam: int, skill_name: str, seed: int) -> Task:
    xk, yk = FAMILIES[fam]
    x, y, skill = VOCABS[xk], VOCABS[yk], SKILLS[skill_name]
    name = f"task{number:03d}_v2_{family_name(xk, yk)}_{skill_name}"
    rng = random.Random(f"tagi-builtin-v2:{seed}:{name}")

    def answer(words, flags):
        return skill.fn(words, flags, x.label, y.label)

    # Two-way skills: each answer on exactly half of the instances (shuffled), drawn by rejection from the
    # family's own input distribution (every answer has probability ~1/2 there, so few draws are rejected).
    targets = None
    if skill.labels is not None:
        targets = list(skill.labels(x.label, y.label)) * (INSTANCES // 2)
        rng.shuffle(targets)
    seen: set[str] = set()
    instances = []
    for i in range(INSTANCES):
        while True:
            words, flags = _draw(rng, x, y)
            text = " ".join(words)
            if text not in seen and (targets is None or answer(words, flags) == targets[i]):
                break
        seen.add(text)
        instances.append(Example(f"task{number:03d}-{i:03d}", text, (answer(words, flags),)))
    positives = []
    for _ in range(NUM_POSITIVES):
        words, flags = _draw(rng, x, y)
        text, out = " ".join(words), answer(words, flags)
        positives.append(Demo(text, out, f'Following the instruction on "{text}" gives "{out}".'))
    words, flags = _draw(rng, x, y)
    right = answer(words, flags)
    wrong = next(w for w in [*words, x.label, y.label, "yes", "no"] if w != right)
    negative = Demo(" ".join(words), wrong, "This answer does not follow the instruction.")
    return Task(
        name=name,
        category=skill.category,
        definitions=tuple(_definition(x, y, skill, v) for v in range(3)),
        instances=tuple(instances),
        positives=tuple(positives),
        negatives=(negative,),
        source="builtin",
    )


@functools.lru_cache(maxsize=4)
def builtin_suite_v2(seed: int = 0) -> dict[str, tuple[Task, ...]]:
    """``{"train": 96 tasks, "dev": 16, "test": 16}`` (the Latin square of :func:`split_of`), deterministic
    from ``seed`` (cached). Numbers: train 1.., test 101.., dev 201.., in family-major order."""
    base = {"train": 1, "test": 101, "dev": 201}
    out: dict[str, list[Task]] = {"train": [], "dev": [], "test": []}
    for fam in range(len(FAMILIES)):
        for j, skill in enumerate(SKILL_NAMES):
            split = split_of(fam, j)
            out[split].append(make_task(base[split] + len(out[split]), fam, skill, seed))
    return {k: tuple(v) for k, v in out.items()}
