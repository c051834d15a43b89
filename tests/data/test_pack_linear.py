"""Packing (issue 30): linear in the corpus size, and the same windows as before for ordinary documents."""

from tagi_ds.data import corpus


class Chars:
    """A tokenizer of one id per character (eos 0): what is packed is visible in the windows."""

    eos_id = 0

    def encode(self, text):
        return [ord(c) for c in text]


def _reference(documents, tok, length):
    """The windows as the old (quadratic) packer cut them: the tokens of all documents, eos after each."""
    flat = [t for doc in documents for t in [*tok.encode(doc), tok.eos_id]]
    return [flat[i : i + length] for i in range(0, len(flat) - length + 1, length)]


def test_pack_gives_the_windows_of_the_joined_documents():
    docs = ["a b c", "", "a much longer document " * 40, "x", "tail y z"]
    for length in (1, 3, 7, 128):
        assert list(corpus.pack(docs, Chars(), length)) == _reference(docs, Chars(), length)


def test_a_long_document_is_encoded_in_pieces_cut_at_whitespace(monkeypatch):
    monkeypatch.setattr(corpus, "PIECE_CHARS", 64)
    doc = " ".join(f"w{i}" for i in range(5000))  # one line of ~24k characters
    pieces = list(corpus._pieces(doc))
    assert "".join(pieces) == doc and len(pieces) > 300
    assert all(len(p) <= 64 for p in pieces) and all(p.startswith(" ") for p in pieces[1:])
    assert list(corpus.pack([doc], Chars(), 50)) == _reference([doc], Chars(), 50)  # cut on characters: same tokens
