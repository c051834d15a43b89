"""Stage-1 pretraining text: read a corpus, pack it into windows, split each window into a | b | c.

Corpus files are read through ``datasets`` in streaming mode (nothing is cached or written):
``*.txt`` / ``*.text`` (one document per non-empty line) and ``*.jsonl`` / ``*.json`` (JSON lines with a
``text`` string field). A directory means all such files below it, in sorted order. Documents are
tokenised, joined with eos and cut into windows of ``data.pretrain_length`` tokens (the tail is dropped).

Each window is its own "task" (K = B): two random cut points split it into a | b | c; the hypernetwork
reads a (as the instruction), the backbone reads b (as the input) and the loss is on c. The cuts are drawn
so that b and c fit ``max_source_length - 1`` / ``max_target_length - 1`` (a longer a is truncated).

``data.streaming=false`` (default) holds all windows in memory and shuffles them per epoch;
``data.streaming=true`` reads the files in order, one pass per epoch, for corpora larger than memory (the
small built-in corpus is always held in memory).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from tagi_ds.data.builtin import ANIMALS, COLORS, FOODS, NUMBER_WORDS, OBJECTS, SENTENCES, TOPICS, builtin_suite, plural
from tagi_ds.data.prompt import format_instance, format_instruction
from tagi_ds.data.task import DataError, show
from tagi_ds.files import check_json_lines, read_text

SUFFIXES = (".txt", ".text", ".jsonl", ".json")
_NAMES = ("anna", "ben", "carla", "david", "emma", "felix", "grace", "hugo", "ivy", "jack", "lena", "omar")


def _sentence(rng: random.Random) -> str:
    """One generated sentence: topic sentences of the built-in suite, simple scenes and small facts."""
    kind = rng.randrange(6)
    if kind == 0:
        topic = rng.choice(sorted(TOPICS))
        adj = rng.choice(("lovely", "great", "sad", "awful", "happy", "boring", "quiet", "strange"))
        return rng.choice(SENTENCES[topic]).format(adj=adj, n=rng.choice(TOPICS[topic])) + "."
    if kind == 1:
        return f"the {rng.choice(COLORS)} {rng.choice(OBJECTS)} is next to the {rng.choice(OBJECTS)}."
    if kind == 2:
        n = rng.randint(2, 9)
        return f"{rng.choice(_NAMES)} has {NUMBER_WORDS[n]} {plural(rng.choice(ANIMALS))} and a {rng.choice(OBJECTS)}."
    if kind == 3:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        fact = f"{a} plus {b} is {a + b}"
        return f"{fact}, and {max(a, b)} is larger than {min(a, b)}." if a != b else fact + "."
    if kind == 4:
        food = rng.choice(FOODS)
        return f"{rng.choice(_NAMES)} likes {plural(food)}, so we bought {rng.randint(2, 9)} {plural(food)} today."
    words = rng.sample(ANIMALS + FOODS + COLORS, 3)
    return f"the words {', '.join(words[:2])} and {words[2]} start with {', '.join(w[0] for w in words)}."


def builtin_documents(seed: int = 0, num_paragraphs: int = 3000) -> list[str]:
    """The built-in corpus: the training tasks' texts (definitions, Tk-Instruct prompts, instances) and
    generated paragraphs. Held-out test tasks are left out so pretraining never sees them. Deterministic."""
    docs = []
    for task in builtin_suite(seed)["train"]:
        docs.extend(task.definitions)
        docs.append(format_instruction(task, "def_pos", 2))
        docs.extend(format_instance(ex.input) + ex.outputs[0] for ex in task.instances[:25])
    rng = random.Random(f"tagi-corpus:{seed}")
    docs.extend(" ".join(_sentence(rng) for _ in range(rng.randint(3, 6))).capitalize() for _ in range(num_paragraphs))
    return docs


def corpus_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"text:{path}: no such file or directory")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise DataError(f"text:{path}: no corpus files ({', '.join(SUFFIXES)}) in the directory")
    return files


def iter_documents(files: Sequence[Path]) -> Iterator[str]:
    """Non-empty documents of the files, in order, read through ``datasets`` (streaming: no cache)."""
    import datasets

    for path in files:
        builder = "json" if path.suffix in (".jsonl", ".json") else "text"
        try:
            rows = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True)
            for i, row in enumerate(rows):
                text = row.get("text")
                if not isinstance(text, str):
                    raise DataError(f"{path}: line {i + 1}: field 'text': expected a string, got {show(text)}")
                if text.strip():
                    yield text
        except DataError:
            raise
        except ValueError as e:  # UnicodeDecodeError; pyarrow.ArrowInvalid (bad JSON lines)
            # Re-read the file to name the first bad byte or line; datasets' message has neither.
            check_json_lines(path) if builder == "json" else read_text(path)
            raise DataError(f"{path}: cannot parse as {builder}: {str(e).splitlines()[0]}") from None


def pack(documents: Iterable[str], tokenizer, length: int) -> Iterator[list[int]]:
    """Windows of ``length`` tokens from the documents joined with eos (the incomplete tail is dropped).

    Linear in the corpus: windows are sliced at a moving offset and the consumed head is dropped once per
    document (deleting each window from the front of the buffer was quadratic in a long document's length: a
    25 MB single-line document took minutes), and a very long document is encoded in pieces split at whitespace
    (:func:`_pieces`)."""
    buf: list[int] = []
    for doc in documents:
        for piece in _pieces(doc):
            buf.extend(tokenizer.encode(piece))
        buf.append(tokenizer.eos_id)
        start = 0
        while len(buf) - start >= length:
            yield buf[start : start + length]
            start += length
        del buf[:start]


PIECE_CHARS = 1 << 20  # documents longer than this are encoded in pieces of about this many characters


def _pieces(doc: str) -> Iterator[str]:
    """``doc`` whole when it is short (every ordinary document: its tokens are unchanged), else pieces of about
    PIECE_CHARS characters cut before a whitespace, so that the tokenizer never holds a 25 MB string at once."""
    if len(doc) <= PIECE_CHARS:
        yield doc
        return
    start = 0
    while start < len(doc):
        end = min(start + PIECE_CHARS, len(doc))
        if end < len(doc):
            cut = doc.rfind(" ", start + PIECE_CHARS // 2, end)
            end = cut if cut > start else end
        yield doc[start:end]
        start = end


def load_windows(source: str | Path | None, tokenizer, length: int) -> np.ndarray:
    """All windows of a corpus (``None`` = the built-in one) as int32 ``[N, length]``."""
    name = "builtin corpus" if source is None else f"text:{source}"
    docs = builtin_documents() if source is None else iter_documents(corpus_files(source))
    windows = list(pack(docs, tokenizer, length))
    if not windows:
        raise DataError(f"{name}: empty corpus: fewer than data.pretrain_length={length} tokens of text")
    return np.asarray(windows, dtype=np.int32)


def split_abc(
    tokens: Sequence[int], variant: int, max_b: int | None = None, max_c: int | None = None
) -> tuple[list[int], list[int], list[int]]:
    """Two random cut points ``0 < i < j < L`` drawn from ``variant``: a = [0, i), b = [i, j), c = [j, L).

    ``j`` is uniform over the positions that leave c at most ``max_c`` tokens, then ``i`` uniform over those
    that leave b at most ``max_b``: the segments fit the backbone's budgets instead of being truncated."""
    n = len(tokens)
    if n < 3:
        raise ValueError(f"a|b|c split needs >= 3 tokens, got {n}")
    rng = random.Random(variant)
    j = rng.randint(max(2, n - max_c) if max_c else 2, n - 1)
    i = rng.randint(max(1, j - max_b) if max_b else 1, j - 1)
    tokens = list(tokens)
    return tokens[:i], tokens[i:j], tokens[j:]


class WindowStream:
    """Sampler-like source of pretraining micro-batches read from the corpus in order (``data.streaming``).

    Global batch ``g`` of a pass holds windows ``[g*B, (g+1)*B)`` and belongs to rank ``g % world_size``; a
    pass ends with the last *complete* round of ``world_size`` batches, so every rank takes the same number
    of steps. ``state_dict`` = (pass, rounds done); resuming re-reads the pass and skips the done rounds
    (exact, at the cost of re-tokenising them). Yields ``[(name, window tokens, variant), ...]``.
    """

    def __init__(
        self,
        files: Sequence[Path],
        tokenizer,
        length: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.files, self.tokenizer, self.length, self.batch_size = list(files), tokenizer, length, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.step = 0, 0
        self._it: Iterator | None = None

    steps_per_epoch = None  # unknown until a pass has been read

    def _rounds(self, epoch: int, skip: int) -> Iterator[list[tuple[str, list[int], int]]]:
        per_round = self.batch_size * self.world_size
        windows = pack(iter_documents(self.files), self.tokenizer, self.length)
        buf, index, rounds = [], 0, 0
        for w in windows:
            buf.append((f"window{epoch}.{index}", w, random.Random(f"{self.seed}:{epoch}:{index}").getrandbits(31)))
            index += 1
            if len(buf) == per_round:
                if rounds >= skip:
                    yield buf[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
                rounds, buf = rounds + 1, []
        if rounds == 0:
            raise DataError(
                f"text:{self.files[0]}: corpus has fewer than one round of windows "
                f"({per_round} windows of {self.length} tokens)"
            )

    def __iter__(self):
        return self

    def __next__(self) -> list[tuple[str, list[int], int]]:
        while True:
            if self._it is None:
                self._it = self._rounds(self.epoch, self.step)
            try:
                plan = next(self._it)
                self.step += 1
                return plan
            except StopIteration:
                self.epoch, self.step, self._it = self.epoch + 1, 0, None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._it = int(state["epoch"]), None
        # A different world size resumes from the same number of consumed windows, rounded down.
        self.step = int(state["step"]) * int(state.get("world_size", self.world_size)) // self.world_size
