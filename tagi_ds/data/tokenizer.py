"""The one tokenizer interface the project uses, for real checkpoints and the built-in tiny models.

- Real checkpoints: ``AutoTokenizer`` from a local directory (``data.tokenizer``, else the model's dir).
- Built-in tiny models: a sentencepiece unigram model trained by this project on its own built-in corpus,
  vocab 1024 (the tiny recipes' ``model.vocab_size``), ids pad=0, eos=1, unk=2, bos=3 (T5's decoder start
  id is pad). It ships as ``tagi_ds/assets/tagi_sp1024.model``; ``python -m tagi_ds.data.tokenizer`` rebuilds
  it. Training is deterministic: one thread, all sentences in a fixed order, no sampling or shuffling.

``encode`` never adds special tokens; the collator places bos/eos itself.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from tagi_ds.data.task import DataError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BUILTIN_MODEL = ASSETS / "tagi_sp1024.model"
BUILTIN_VOCAB = 1024
PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3


class Tokenizer:
    """``encode(text) -> ids`` (no special tokens), ``decode(ids) -> text`` (special ids and -100 skipped)."""

    name: str
    vocab_size: int
    pad_id: int
    eos_id: int
    bos_id: int | None  # None: the tokenizer has no bos (T5)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def chat_parts(self) -> tuple[str, str, str] | None:
        """The chat template around one user message: ``(prefix, turn_end, reply)`` strings such that the
        template renders ``prefix + message + turn_end``, and ``prefix + message + reply`` with the assistant's
        turn opened (the generation prompt). A leading bos is left out (the collator places it). None: no
        template (the built-in sentencepiece model, T5, base checkpoints without one)."""
        return None

    @property
    def special_ids(self) -> dict[str, int | None]:
        """The ids a backbone is built with (``model.build_backbone``): pad, eos and bos."""
        return {"pad_id": self.pad_id, "eos_id": self.eos_id, "bos_id": self.bos_id}

    def _keep(self, ids: Sequence[int]) -> list[int]:
        drop = {self.pad_id, self.eos_id, self.bos_id, -100}
        return [int(i) for i in ids if int(i) not in drop]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model: bytes | str | Path = BUILTIN_MODEL):
        import sentencepiece as spm

        if isinstance(model, bytes):
            self.name, proto = "sentencepiece", model
        else:
            path = Path(model)
            if not path.is_file():
                raise DataError(f"{path}: sentencepiece model file missing")
            self.name, proto = str(path), path.read_bytes()
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id, self.eos_id, self.bos_id = self.sp.pad_id(), self.sp.eos_id(), self.sp.bos_id()
        self.bos_id = None if self.bos_id < 0 else self.bos_id

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(self._keep(ids))


class HFTokenizer(Tokenizer):
    """A local Hugging Face tokenizer directory (T5: no bos, pad=0, eos=1; LLaMA: bos=1, eos=2, pad := eos)."""

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise DataError(f"{path}: tokenizer directory missing (data.tokenizer / model.model_name_or_path)")
        try:
            self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot load a tokenizer: {str(e).splitlines()[0]}") from None
        self.name, self.vocab_size = str(path), len(self.tok)
        if self.tok.eos_token_id is None:
            raise DataError(f"{path}: tokenizer has no eos token (field eos_token is None)")
        self.eos_id, self.bos_id = self.tok.eos_token_id, self.tok.bos_token_id
        # LLaMA tokenizers have no pad token; padded positions are masked out, so any id works.
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def chat_parts(self) -> tuple[str, str, str] | None:
        if not getattr(self.tok, "chat_template", None):
            return None
        mark = "\ue000message\ue000"  # a private-use sentinel no template alters
        rendered = []
        for reply in (False, True):
            text = self.tok.apply_chat_template(
                [{"role": "user", "content": mark}], tokenize=False, add_generation_prompt=reply
            )
            if text.count(mark) != 1:
                raise DataError(
                    f"{self.name}: the chat template does not render a user message verbatim "
                    "(data.chat_template); set data.chat_template=false"
                )
            rendered.append(text.split(mark))
        (prefix, turn_end), (_, reply) = rendered
        bos = self.tok.bos_token
        if bos and prefix.startswith(bos):
            prefix = prefix[len(bos) :]
        return prefix, turn_end, reply

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(self._keep(ids), skip_special_tokens=True)


def training_sentences(seed: int = 0) -> list[str]:
    """The built-in tokenizer's training text: the built-in corpus, one line per sentence, in a fixed order,
    plus one line of printable ASCII so every such character has a piece."""
    from tagi_ds.data.corpus import builtin_documents

    lines = [line for doc in builtin_documents(seed) for line in doc.splitlines() if line.strip()]
    return lines + ["".join(chr(c) for c in range(33, 127))]


def train_sentencepiece(
    sentences: Sequence[str] | None = None, seed: int = 0, vocab_size: int = BUILTIN_VOCAB
) -> bytes:
    """Train the built-in unigram model and return its bytes (deterministic for the same input)."""
    import sentencepiece as spm

    lines = training_sentences(seed) if sentences is None else list(sentences)
    if not any(s.strip() for s in lines):
        raise DataError("tokenizer training: empty corpus (no non-empty sentence)")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        bos_piece="<s>",
        character_coverage=1.0,
        split_digits=True,
        byte_fallback=True,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=8192,
        minloglevel=2,
    )
    return buf.getvalue()


def build_builtin_tokenizer(out: str | Path = BUILTIN_MODEL, seed: int = 0) -> Path:
    """Train and write the built-in model (temp file + os.replace)."""
    from tagi_ds.files import atomic_write

    atomic_write(out, train_sentencepiece(seed=seed))
    return Path(out)


def load_tokenizer(cfg) -> Tokenizer:
    """``cfg.data.tokenizer`` dir, else ``cfg.model.model_name_or_path`` dir, else the built-in model.

    The tokenizer's vocabulary must fit the model's embedding (``model.vocab_size``)."""
    path = cfg.data.tokenizer or cfg.model.model_name_or_path
    tok = HFTokenizer(path) if path else SentencePieceTokenizer(BUILTIN_MODEL)
    if tok.vocab_size > cfg.model.vocab_size:
        raise DataError(
            f"{tok.name}: tokenizer vocab_size {tok.vocab_size} > model.vocab_size "
            f"{cfg.model.vocab_size}; ids would fall outside the embedding"
        )
    return tok


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Rebuild the built-in sentencepiece model.")
    parser.add_argument("--out", default=str(BUILTIN_MODEL))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_builtin_tokenizer(args.out, args.seed))
