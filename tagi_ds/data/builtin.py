"""The built-in instruction suite: procedurally generated text tasks small enough for a tiny model on CPU.

Every task draws its inputs from one of a few *families* (a list of words, one word, a pair of numbers,
a list of digits, a sentence, a number word). All tasks of a family share the same input distribution, so
the input alone never tells which task it is: a model has to read the instruction. A task is a chain of
*skills* (reverse the words, uppercase, add, ...) applied to the input tokens; its definitions are three
paraphrases (family intro x skill phrasing). Held-out test tasks are new chains of skills seen in
training (reverse then uppercase, sort then take the first, ...) and a few new variants of seen skills
(is it about food?, count the odd numbers), so following instructions has to generalise. A development
split of further new chains (``dev``) is held out the same way, for tuning without looking at the test tasks.

Inputs are <= 12 words and outputs <= 12 tokens. Everything is deterministic from the seed
(``random.Random`` seeded with strings is stable across platforms and runs).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tagi_ds.data.task import Demo, Example, Task

ANIMALS = (
    "cat",
    "dog",
    "horse",
    "cow",
    "sheep",
    "goat",
    "lion",
    "tiger",
    "bear",
    "wolf",
    "fox",
    "rabbit",
    "mouse",
    "duck",
    "owl",
    "frog",
    "snake",
    "fish",
    "whale",
    "shark",
    "zebra",
    "monkey",
    "eagle",
    "goose",
)
FOODS = (
    "bread",
    "apple",
    "banana",
    "cheese",
    "rice",
    "soup",
    "cake",
    "pizza",
    "pasta",
    "salad",
    "carrot",
    "grape",
    "lemon",
    "honey",
    "butter",
    "egg",
    "milk",
    "tea",
    "cookie",
    "pear",
)
OBJECTS = (
    "chair",
    "table",
    "lamp",
    "book",
    "pen",
    "cup",
    "door",
    "window",
    "clock",
    "phone",
    "bag",
    "shoe",
    "hat",
    "key",
    "box",
    "brush",
    "car",
    "bike",
    "boat",
    "train",
)
COLORS = ("red", "blue", "green", "yellow", "black", "white", "pink", "purple", "brown", "gray")
WEATHER = ("rain", "snow", "wind", "storm", "fog", "sunshine", "heat", "frost")
SPORTS = ("football", "tennis", "hockey", "golf", "rugby", "cricket", "baseball", "volleyball")
POSITIVE = ("lovely", "great", "happy", "wonderful", "pleasant", "cheerful", "brilliant")
NEGATIVE = ("awful", "terrible", "sad", "horrible", "gloomy", "boring", "dreadful")
NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
)
TOPICS = {"animal": ANIMALS, "food": FOODS, "weather": WEATHER, "sport": SPORTS}
SENTENCES = {
    "animal": (
        "the {adj} {n} sleeps in the barn",
        "we saw the {adj} {n} near the river",
        "the {adj} {n} ran across the field",
    ),
    "food": ("we ate the {adj} {n} for dinner", "the {n} at lunch was {adj}", "my friend made {adj} {n} yesterday"),
    "weather": (
        "the {adj} {n} lasted all night",
        "there was {adj} {n} this morning",
        "everyone talked about the {adj} {n} today",
    ),
    "sport": ("we watched the {adj} {n} match", "the {n} game was {adj}", "our team played {adj} {n} on sunday"),
}
_IRREGULAR = {"mouse": "mice", "sheep": "sheep", "fish": "fish", "goose": "geese", "wolf": "wolves"}
TRAIN_INSTANCES, TEST_INSTANCES, NUM_POSITIVES = 100, 50, 3


def plural(word: str) -> str:
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word.endswith(("s", "x", "sh", "ch")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _topic(words: list[str]) -> str:
    return next(t for t, vocab in TOPICS.items() if any(w in vocab for w in words))


def _yes(flag: bool) -> list[str]:
    return ["yes" if flag else "no"]


def _map(f: Callable[[str], str]) -> Callable[[list[str]], list[str]]:
    return lambda xs: [f(x) for x in xs]


@dataclass(frozen=True)
class Skill:
    """One step of a task: tokens -> tokens, with imperative phrasings ({item}/{items} from the family)."""

    fn: Callable[[list[str]], list[str]]
    phrases: tuple[str, ...]


def _sk(fn: Callable[[list[str]], list[str]], *phrases: str) -> Skill:
    return Skill(fn, phrases)


SKILLS: dict[str, Skill] = {
    # order and selection
    "copy": _sk(
        list,
        "copy the input exactly",
        "repeat the {items} without changing anything",
        "write the input again, unchanged",
    ),
    "reverse": _sk(
        lambda xs: xs[::-1],
        "reverse the order of the {items}",
        "write the {items} from last to first",
        "list the {items} backwards, starting with the last one",
    ),
    "sort_alpha": _sk(
        sorted,
        "sort the words in alphabetical order",
        "arrange the words alphabetically",
        "put the words in dictionary order",
    ),
    "sort_asc": _sk(
        lambda xs: sorted(xs, key=int),
        "sort the numbers from smallest to largest",
        "arrange the numbers in increasing order",
        "put the numbers in ascending order",
    ),
    "sort_desc": _sk(
        lambda xs: sorted(xs, key=int, reverse=True),
        "sort the numbers from largest to smallest",
        "arrange the numbers in decreasing order",
        "put the numbers in descending order",
    ),
    "dedupe": _sk(
        lambda xs: list(dict.fromkeys(xs)),
        "remove repeated {items}, keeping their first occurrence",
        "delete duplicates so that each {item} appears once",
        "keep every distinct {item} only once, in the original order",
    ),
    "drop_first": _sk(
        lambda xs: xs[1:] or ["none"],
        "remove the first {item}",
        "delete the {item} at the start",
        "write all {items} except the first one",
    ),
    "swap_ends": _sk(
        lambda xs: [xs[-1], *xs[1:-1], xs[0]] if len(xs) > 1 else xs,
        "swap the first and the last {item}",
        "exchange the positions of the first and last {items}",
        "put the last {item} first and the first {item} last",
    ),
    "join_hyphen": _sk(
        lambda xs: ["-".join(xs)],
        "join the {items} with hyphens",
        "connect the {items} using a dash between each pair",
        "glue the {items} together with '-' between them",
    ),
    "first": _sk(
        lambda xs: xs[:1], "give the first {item}", "return the {item} that comes first", "write only the first {item}"
    ),
    "last": _sk(
        lambda xs: xs[-1:], "give the last {item}", "return the {item} that comes last", "write only the final {item}"
    ),
    "second": _sk(
        lambda xs: xs[1:2], "give the second {item}", "return {item} number two", "write only the second {item}"
    ),
    "third": _sk(
        lambda xs: xs[2:3], "give the third {item}", "return {item} number three", "write only the third {item}"
    ),
    "longest": _sk(
        lambda xs: [max(xs, key=len)],
        "give the longest word, the first one if there is a tie",
        "return the word with the most letters, taking the earliest on a tie",
        "write the longest word, choosing the first of equally long ones",
    ),
    "only_animals": _sk(
        lambda xs: [x for x in xs if x in ANIMALS] or ["none"],
        "keep only the words that name animals, or write none",
        "remove every word that is not an animal, answering none if nothing is left",
        "list the animal words in order, writing none if there are no animals",
    ),
    # letters and case
    "uppercase": _sk(
        _map(str.upper),
        "write every letter in upper case",
        "convert the text to capital letters",
        "change all letters to uppercase",
    ),
    "capitalize": _sk(
        _map(str.capitalize),
        "capitalize the first letter of every word",
        "start each word with a capital letter",
        "make the first letter of each word upper case",
    ),
    "reverse_letters": _sk(
        _map(lambda x: x[::-1]),
        "spell the word backwards",
        "reverse the order of its letters",
        "write the letters in reverse order",
    ),
    "sort_letters": _sk(
        _map(lambda x: "".join(sorted(x))),
        "sort the letters in alphabetical order",
        "rearrange the letters alphabetically",
        "write the same letters ordered from a to z",
    ),
    "spell": _sk(
        lambda xs: [c for x in xs for c in x],
        "spell the word with a space between the letters",
        "write its letters one by one, separated by spaces",
        "split the word into single letters",
    ),
    "first_letter": _sk(
        _map(lambda x: x[0]),
        "give the first letter of the word",
        "write only its initial letter",
        "return the letter the word starts with",
    ),
    "last_letter": _sk(
        _map(lambda x: x[-1]),
        "give the last letter of the word",
        "write only its final letter",
        "return the letter the word ends with",
    ),
    "remove_vowels": _sk(
        _map(lambda x: "".join(c for c in x if c.lower() not in "aeiou")),
        "remove the vowels from the word",
        "delete every a, e, i, o and u",
        "write the word without its vowels",
    ),
    "initials": _sk(
        lambda xs: ["".join(x[0] for x in xs)],
        "write the first letter of each word, joined together",
        "form one string from the initial letters of the words",
        "join the initial letter of every word",
    ),
    "double": _sk(
        lambda xs: xs + xs,
        "write the word twice",
        "repeat the word two times",
        "say the word two times, separated by a space",
    ),
    # counting
    "count": _sk(
        lambda xs: [str(len(xs))],
        "count how many {items} there are",
        "give the number of {items}",
        "say how many {items} the input contains",
    ),
    "count_letters": _sk(
        lambda xs: [str(sum(map(len, xs)))],
        "count the letters of the word",
        "say how many letters the word has",
        "give the length of the word in letters",
    ),
    "count_vowels": _sk(
        lambda xs: [str(sum(c in "aeiou" for x in xs for c in x))],
        "count the vowels in the word",
        "say how many of its letters are vowels",
        "give the number of a, e, i, o and u letters",
    ),
    "lengths": _sk(
        _map(lambda x: str(len(x))),
        "replace each word by its number of letters",
        "give the length of every word",
        "write how many letters each word has",
    ),
    "count_animals": _sk(
        lambda xs: [str(sum(x in ANIMALS for x in xs))],
        "count the words that name animals",
        "say how many animals are mentioned",
        "give the number of animal words",
    ),
    "count_colors": _sk(
        lambda xs: [str(sum(x in COLORS for x in xs))],
        "count the words that name colors",
        "say how many colors are mentioned",
        "give the number of color words",
    ),
    "count_even": _sk(
        lambda xs: [str(sum(int(x) % 2 == 0 for x in xs))],
        "count the even numbers",
        "say how many of the numbers are even",
        "give the number of even values",
    ),
    "count_odd": _sk(
        lambda xs: [str(sum(int(x) % 2 == 1 for x in xs))],
        "count how many of the numbers are odd",
        "give the number of odd values in the list",
        "say how many numbers cannot be divided by two",
    ),
    # arithmetic
    "add": _sk(
        lambda xs: [str(sum(map(int, xs)))],
        "add the two numbers",
        "compute the sum of the two numbers",
        "give the total of both numbers",
    ),
    "sum": _sk(
        lambda xs: [str(sum(map(int, xs)))],
        "add up all the numbers",
        "compute the sum of the numbers",
        "give the total of the list",
    ),
    "subtract": _sk(
        lambda xs: [str(int(xs[0]) - int(xs[1]))],
        "subtract the second number from the first",
        "compute the first number minus the second",
        "take the second number away from the first",
    ),
    "multiply": _sk(
        lambda xs: [str(int(xs[0]) * int(xs[1]))],
        "multiply the two numbers",
        "compute the product of the two numbers",
        "give the first number times the second",
    ),
    "larger": _sk(
        lambda xs: [max(xs, key=int)],
        "give the larger of the two numbers",
        "return the bigger number",
        "write whichever number is greater",
    ),
    "smaller": _sk(
        lambda xs: [min(xs, key=int)],
        "give the smaller of the two numbers",
        "return the lesser number",
        "write whichever number is smaller",
    ),
    "max": _sk(
        lambda xs: [max(xs, key=int)],
        "give the largest number",
        "return the maximum of the list",
        "write the biggest value",
    ),
    "min": _sk(
        lambda xs: [min(xs, key=int)],
        "give the smallest number",
        "return the minimum of the list",
        "write the lowest value",
    ),
    "absdiff": _sk(
        lambda xs: [str(abs(int(xs[0]) - int(xs[1])))],
        "give the distance between the two numbers",
        "subtract the smaller number from the larger one",
        "compute how far apart the two numbers are",
    ),
    "add_one": _sk(
        _map(lambda x: str(int(x) + 1)),
        "add one to each number",
        "increase every number by 1",
        "write each number plus one",
    ),
    "times_two": _sk(
        _map(lambda x: str(2 * int(x))),
        "double each number",
        "multiply every number by two",
        "write twice the value of each number",
    ),
    # classification
    "first_larger": _sk(
        lambda xs: _yes(int(xs[0]) > int(xs[1])),
        "answer yes if the first number is larger than the second, otherwise no",
        "say yes when the first number is greater and no when it is not",
        "reply yes or no: is the first number bigger than the second?",
    ),
    "parity": _sk(
        _map(lambda x: "even" if int(x) % 2 == 0 else "odd"),
        "say whether the number is even or odd",
        "answer even or odd for the number",
        "tell if the number is odd or even",
    ),
    "has_animal": _sk(
        lambda xs: _yes(any(x in ANIMALS for x in xs)),
        "answer yes if any word names an animal, otherwise no",
        "say yes when an animal is mentioned and no when none is",
        "reply yes or no: is there an animal among the words?",
    ),
    "has_color": _sk(
        lambda xs: _yes(any(x in COLORS for x in xs)),
        "answer yes if any word is a color, otherwise no",
        "say yes when a color is mentioned and no when none is",
        "reply yes or no: is there a color among the words?",
    ),
    "is_animal": _sk(
        lambda xs: _yes(xs[0] in ANIMALS),
        "answer yes if the word names an animal, otherwise no",
        "say yes for an animal and no for anything else",
        "reply yes or no: is it an animal?",
    ),
    "topic": _sk(
        lambda xs: [_topic(xs)],
        "say what the sentence is about: animal, food, weather or sport",
        "classify the topic of the sentence as animal, food, weather or sport",
        "answer with the topic, one of animal, food, weather, sport",
    ),
    "about_animal": _sk(
        lambda xs: _yes(_topic(xs) == "animal"),
        "answer yes if the sentence is about an animal",
        "say yes when the sentence talks about an animal and no otherwise",
        "reply yes or no: is the sentence about animals?",
    ),
    "about_weather": _sk(
        lambda xs: _yes(_topic(xs) == "weather"),
        "answer yes if the sentence is about the weather",
        "say yes when the sentence talks about the weather and no otherwise",
        "reply yes or no: is the sentence about weather?",
    ),
    "about_sport": _sk(
        lambda xs: _yes(_topic(xs) == "sport"),
        "answer yes if the sentence is about a sport",
        "say yes when the sentence talks about a sport and no otherwise",
        "reply yes or no: is the sentence about sports?",
    ),
    "about_food": _sk(
        lambda xs: _yes(_topic(xs) == "food"),
        "answer yes if the sentence is about food",
        "say yes when the sentence talks about something to eat and no otherwise",
        "reply yes or no: is the sentence about food?",
    ),
    "sentiment": _sk(
        lambda xs: ["positive" if any(x in POSITIVE for x in xs) else "negative"],
        "say whether the sentence is positive or negative",
        "classify the feeling of the sentence as positive or negative",
        "answer positive or negative for the tone of the sentence",
    ),
    "is_positive": _sk(
        lambda xs: _yes(any(x in POSITIVE for x in xs)),
        "answer yes if the sentence sounds positive",
        "say yes when the sentence expresses a good feeling and no otherwise",
        "reply yes or no: is the sentence positive?",
    ),
    "is_negative": _sk(
        lambda xs: _yes(any(x in NEGATIVE for x in xs)),
        "answer yes if the sentence sounds negative",
        "say yes when the sentence expresses a bad feeling and no otherwise",
        "reply yes or no: is the sentence negative?",
    ),
    "topic_word": _sk(
        lambda xs: [x for x in xs if any(x in v for v in TOPICS.values())],
        "give the word that names what the sentence is about",
        "find the animal, food, weather or sport word in the sentence",
        "write the noun that tells the topic of the sentence",
    ),
    "describing_word": _sk(
        lambda xs: [x for x in xs if x in POSITIVE or x in NEGATIVE],
        "give the describing word of the sentence",
        "find the adjective that expresses a feeling",
        "write the word that says how something was",
    ),
    # word mapping
    "plural": _sk(
        _map(plural),
        "write the plural form of the word",
        "turn the word into its plural",
        "give the word for more than one of it",
    ),
    "article": _sk(
        _map(lambda x: ("an " if x[0] in "aeiou" else "a ") + x),
        "put a or an in front of the word",
        "add the right indefinite article before the word",
        "write the word after a or an, whichever fits",
    ),
    "category": _sk(
        _map(lambda x: "animal" if x in ANIMALS else "food" if x in FOODS else "object"),
        "say whether the word is an animal, a food or an object",
        "classify the word as animal, food or object",
        "answer animal, food or object for the word",
    ),
    "to_digit": _sk(
        _map(lambda w: str(NUMBER_WORDS.index(w))),
        "write the number with digits",
        "convert the number word into digits",
        "give the numeral for the word",
    ),
    "next_word": _sk(
        _map(lambda w: NUMBER_WORDS[NUMBER_WORDS.index(w) + 1]),
        "write the next number as a word",
        "give the word for the number that comes after it",
        "spell out the number that is one larger",
    ),
    "prev_word": _sk(
        _map(lambda w: NUMBER_WORDS[NUMBER_WORDS.index(w) - 1]),
        "write the previous number as a word",
        "give the word for the number that comes before it",
        "spell out the number that is one smaller",
    ),
}


def _draw_words(rng: random.Random) -> list[str]:
    words = rng.sample(ANIMALS + FOODS + OBJECTS + COLORS, rng.randint(3, 6))
    if rng.random() < 0.4:  # a repeat, so that "remove duplicates" has something to do
        words.insert(rng.randint(0, len(words)), rng.choice(words))
    return words


def _draw_sentence(rng: random.Random) -> list[str]:
    topic = rng.choice(sorted(TOPICS))
    adj = rng.choice(POSITIVE if rng.random() < 0.5 else NEGATIVE)
    return rng.choice(SENTENCES[topic]).format(adj=adj, n=rng.choice(TOPICS[topic])).split()


@dataclass(frozen=True)
class Family:
    """A shared input distribution; ``intros`` are the paraphrased first sentences of its definitions."""

    intros: tuple[str, str, str]
    item: str
    draw: Callable[[random.Random], list[str]]


FAMILIES: dict[str, Family] = {
    "words": Family(
        (
            "You are given a list of words separated by spaces.",
            "The input is a short sequence of words.",
            "In this task you receive several words.",
        ),
        "word",
        _draw_words,
    ),
    "word": Family(
        ("You are given a single English word.", "The input is one word.", "In this task you receive a word."),
        "word",
        lambda rng: [rng.choice(ANIMALS + FOODS + OBJECTS)],
    ),
    "pair": Family(
        (
            "You are given two numbers separated by a space.",
            "The input contains two whole numbers.",
            "In this task you receive a pair of numbers.",
        ),
        "number",
        lambda rng: [str(rng.randint(0, 20)), str(rng.randint(0, 20))],
    ),
    "digits": Family(
        (
            "You are given a list of single-digit numbers.",
            "The input is a sequence of digits separated by spaces.",
            "In this task you receive several small numbers.",
        ),
        "number",
        lambda rng: [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 6))],
    ),
    "sentence": Family(
        ("You are given a short sentence.", "The input is one sentence.", "In this task you read a sentence."),
        "word",
        _draw_sentence,
    ),
    "numword": Family(
        (
            "You are given a number written as an English word.",
            "The input is a number spelled out in letters.",
            "In this task you receive the name of a number.",
        ),
        "number",
        lambda rng: [NUMBER_WORDS[rng.randint(1, 19)]],
    ),
}

# (family, skills, category); a chain's category is its first skill's. Train chains include a few two-step
# ones so that "First ..., then ..." is seen.
_ORD, _CASE, _EXT, _CNT = "Ordering", "Case Conversion", "Extraction", "Counting"
_ARI, _SPL, _CLS, _MAP = "Arithmetic", "Spelling", "Classification", "Word Mapping"
TRAIN = [
    ("words", ("copy",), _ORD),
    ("words", ("reverse",), _ORD),
    ("words", ("sort_alpha",), _ORD),
    ("words", ("dedupe",), _ORD),
    ("words", ("drop_first",), _ORD),
    ("words", ("swap_ends",), _ORD),
    ("words", ("join_hyphen",), _ORD),
    ("words", ("sort_alpha", "join_hyphen"), _ORD),
    ("words", ("dedupe", "reverse"), _ORD),
    ("words", ("uppercase",), _CASE),
    ("words", ("capitalize",), _CASE),
    ("words", ("first",), _EXT),
    ("words", ("last",), _EXT),
    ("words", ("second",), _EXT),
    ("words", ("third",), _EXT),
    ("words", ("longest",), _EXT),
    ("words", ("only_animals",), _EXT),
    ("words", ("count",), _CNT),
    ("words", ("count_animals",), _CNT),
    ("words", ("count_colors",), _CNT),
    ("words", ("lengths",), _CNT),
    ("words", ("initials",), _SPL),
    ("words", ("has_animal",), _CLS),
    ("words", ("has_color",), _CLS),
    ("word", ("reverse_letters",), _SPL),
    ("word", ("sort_letters",), _SPL),
    ("word", ("spell",), _SPL),
    ("word", ("remove_vowels",), _SPL),
    ("word", ("double",), _SPL),
    ("word", ("uppercase",), _CASE),
    ("word", ("capitalize",), _CASE),
    ("word", ("first_letter",), _EXT),
    ("word", ("last_letter",), _EXT),
    ("word", ("count_letters",), _CNT),
    ("word", ("count_vowels",), _CNT),
    ("word", ("plural",), _MAP),
    ("word", ("article",), _MAP),
    ("word", ("category",), _MAP),
    ("word", ("is_animal",), _CLS),
    ("word", ("uppercase", "double"), _CASE),
    ("pair", ("add",), _ARI),
    ("pair", ("subtract",), _ARI),
    ("pair", ("multiply",), _ARI),
    ("pair", ("larger",), _ARI),
    ("pair", ("smaller",), _ARI),
    ("pair", ("absdiff",), _ARI),
    ("pair", ("first_larger",), _CLS),
    ("pair", ("add", "parity"), _ARI),
    ("digits", ("sum",), _ARI),
    ("digits", ("max",), _ARI),
    ("digits", ("min",), _ARI),
    ("digits", ("add_one",), _ARI),
    ("digits", ("times_two",), _ARI),
    ("digits", ("sort_asc",), _ORD),
    ("digits", ("sort_desc",), _ORD),
    ("digits", ("reverse",), _ORD),
    ("digits", ("first",), _EXT),
    ("digits", ("last",), _EXT),
    ("digits", ("count",), _CNT),
    ("digits", ("count_even",), _CNT),
    ("digits", ("sort_desc", "join_hyphen"), _ORD),
    ("sentence", ("topic",), _CLS),
    ("sentence", ("about_animal",), _CLS),
    ("sentence", ("about_weather",), _CLS),
    ("sentence", ("about_sport",), _CLS),
    ("sentence", ("sentiment",), _CLS),
    ("sentence", ("is_positive",), _CLS),
    ("sentence", ("topic_word",), _EXT),
    ("sentence", ("describing_word",), _EXT),
    ("sentence", ("count",), _CNT),
    ("sentence", ("last",), _EXT),
    ("numword", ("to_digit",), _MAP),
    ("numword", ("next_word",), _MAP),
    ("numword", ("prev_word",), _MAP),
    ("numword", ("to_digit", "parity"), _MAP),
    ("numword", ("to_digit", "times_two"), _MAP),
]
TEST = [
    ("words", ("reverse", "uppercase"), _ORD),
    ("words", ("sort_alpha", "first"), _ORD),
    ("words", ("last", "uppercase"), _EXT),
    ("words", ("dedupe", "count"), _ORD),
    ("words", ("reverse", "join_hyphen"), _ORD),
    ("words", ("reverse", "second"), _ORD),
    ("words", ("only_animals", "uppercase"), _EXT),
    ("words", ("initials", "uppercase"), _SPL),
    ("words", ("sort_alpha", "capitalize"), _ORD),
    ("word", ("reverse_letters", "uppercase"), _SPL),
    ("word", ("sort_letters", "reverse_letters"), _SPL),
    ("word", ("remove_vowels", "uppercase"), _SPL),
    ("word", ("first_letter", "uppercase"), _EXT),
    ("word", ("reverse_letters", "spell"), _SPL),
    ("word", ("plural", "uppercase"), _MAP),
    ("pair", ("add", "add_one"), _ARI),
    ("pair", ("multiply", "parity"), _ARI),
    ("pair", ("larger", "times_two"), _ARI),
    ("digits", ("sort_asc", "second"), _ORD),
    ("digits", ("reverse", "add_one"), _ORD),
    ("digits", ("count_odd",), _CNT),
    ("digits", ("sum", "parity"), _ARI),
    ("sentence", ("about_food",), _CLS),
    ("sentence", ("is_negative",), _CLS),
    ("sentence", ("topic", "uppercase"), _CLS),
    ("sentence", ("topic_word", "plural"), _EXT),
    ("sentence", ("describing_word", "uppercase"), _EXT),
    ("numword", ("to_digit", "add_one"), _MAP),
    ("numword", ("next_word", "uppercase"), _MAP),
]
# Development split: more new chains of training skills, disjoint from TRAIN and TEST. Tune on these (held out
# of every training stage like the test tasks), report on TEST once.
DEV = [
    ("words", ("reverse", "first"), _ORD),
    ("words", ("sort_alpha", "last"), _ORD),
    ("words", ("dedupe", "uppercase"), _ORD),
    ("words", ("drop_first", "reverse"), _ORD),
    ("words", ("first", "uppercase"), _EXT),
    ("words", ("only_animals", "reverse"), _EXT),
    ("words", ("uppercase", "join_hyphen"), _CASE),
    ("word", ("reverse_letters", "capitalize"), _SPL),
    ("word", ("sort_letters", "uppercase"), _SPL),
    ("word", ("remove_vowels", "reverse_letters"), _SPL),
    ("word", ("last_letter", "uppercase"), _EXT),
    ("word", ("plural", "capitalize"), _MAP),
    ("pair", ("add", "times_two"), _ARI),
    ("pair", ("smaller", "add_one"), _ARI),
    ("pair", ("absdiff", "parity"), _ARI),
    ("digits", ("sort_desc", "first"), _ORD),
    ("digits", ("max", "times_two"), _ARI),
    ("sentence", ("topic_word", "uppercase"), _EXT),
    ("sentence", ("sentiment", "uppercase"), _CLS),
    ("numword", ("prev_word", "to_digit"), _MAP),
    ("numword", ("prev_word", "uppercase"), _MAP),
]


def _definition(family: Family, skills: tuple[str, ...], variant: int) -> str:
    fill = {"item": family.item, "items": family.item + "s"}
    phrases = [SKILLS[s].phrases[variant % len(SKILLS[s].phrases)].format(**fill) for s in skills]
    body = phrases[0] if len(phrases) == 1 else "first " + ", then ".join(phrases)
    return f"{family.intros[variant]} {body[0].upper()}{body[1:]}{'' if body.endswith('?') else '.'}"


def _apply(skills: tuple[str, ...], tokens: list[str]) -> str:
    for s in skills:
        tokens = SKILLS[s].fn(tokens)
    return " ".join(tokens)


def make_task(
    number: int, family_name: str, skills: tuple[str, ...], category: str, seed: int, num_instances: int
) -> Task:
    family = FAMILIES[family_name]
    name = f"task{number:03d}_{family_name}_{'_then_'.join(skills)}"
    rng = random.Random(f"tagi-builtin:{seed}:{name}")
    seen: set[str] = set()
    instances = []
    for i in range(num_instances):
        for _ in range(20):  # prefer distinct inputs; small families (21 number words) must repeat
            tokens = family.draw(rng)
            if " ".join(tokens) not in seen:
                break
        seen.add(" ".join(tokens))
        instances.append(Example(f"task{number:03d}-{i:03d}", " ".join(tokens), (_apply(skills, tokens),)))
    positives = []
    for _ in range(NUM_POSITIVES):
        tokens = family.draw(rng)
        text, out = " ".join(tokens), _apply(skills, tokens)
        positives.append(Demo(text, out, f'Following the instruction on "{text}" gives "{out}".'))
    tokens = family.draw(rng)
    wrong = " ".join(tokens[::-1]) if " ".join(tokens[::-1]) != _apply(skills, tokens) else " ".join(tokens * 2)
    negative = Demo(" ".join(tokens), wrong, "This answer does not follow the instruction.")
    return Task(
        name=name,
        category=category,
        definitions=tuple(_definition(family, skills, v) for v in range(3)),
        instances=tuple(instances),
        positives=tuple(positives),
        negatives=(negative,),
        source="builtin",
    )


@functools.lru_cache(maxsize=4)
def builtin_suite(seed: int = 0) -> dict[str, tuple[Task, ...]]:
    """``{"train": tasks, "dev": held-out development tasks, "test": held-out tasks}``, deterministic from
    ``seed`` (cached)."""
    train = tuple(make_task(i + 1, f, s, c, seed, TRAIN_INSTANCES) for i, (f, s, c) in enumerate(TRAIN))
    test = tuple(make_task(101 + i, f, s, c, seed, TEST_INSTANCES) for i, (f, s, c) in enumerate(TEST))
    dev = tuple(make_task(201 + i, f, s, c, seed, TEST_INSTANCES) for i, (f, s, c) in enumerate(DEV))
    return {"train": train, "dev": dev, "test": test}


def write_builtin(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the suite in the SNI on-disk layout (``tasks/*.json`` + ``splits/default/*.txt``)."""
    from tagi_ds.data.sni import write_sni

    suite = builtin_suite(seed)
    return write_sni(out_dir, train=suite["train"], test=suite["test"])
