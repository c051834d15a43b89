"""The tokenizer interface: the shipped sentencepiece model, its deterministic rebuild, HF directories."""

import pytest

from tagi_ds.data.task import DataError
from tagi_ds.data.tokenizer import (
    BUILTIN_MODEL,
    HFTokenizer,
    SentencePieceTokenizer,
    build_builtin_tokenizer,
    load_tokenizer,
    train_sentencepiece,
)
from tests.data.conftest import make_cfg


def test_rebuild_from_the_same_seed_is_byte_identical(tmp_path):
    first = train_sentencepiece(seed=0)
    assert train_sentencepiece(seed=0) == first
    assert BUILTIN_MODEL.read_bytes() == first  # the shipped asset is what the code builds
    out = build_builtin_tokenizer(tmp_path / "sp.model", seed=0)
    assert out.read_bytes() == first and [p.name for p in tmp_path.iterdir()] == ["sp.model"]


def test_builtin_ids_and_vocab(tok):
    assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.sp.unk_id(), tok.bos_id) == (1024, 0, 1, 2, 3)
    assert [tok.sp.id_to_piece(i) for i in range(4)] == ["<pad>", "</s>", "<unk>", "<s>"]
    assert tok.vocab_size == make_cfg("tiny").model.vocab_size == make_cfg("tiny-llama").model.vocab_size


def test_encode_has_no_special_tokens_and_decode_round_trips(tok):
    text = "You are given a list of words. Reverse them: cat dog 12 + 7 = 19"
    ids = tok.encode(text)
    assert ids and not {0, 1, 2, 3} & set(ids)
    assert tok.decode(ids) == text
    assert tok.decode([*ids, tok.eos_id, tok.pad_id, -100]) == text
    # byte fallback: text the corpus never had still round-trips, with no <unk>
    odd = "Café ünïcode – 東京"
    assert 2 not in tok.encode(odd) and tok.decode(tok.encode(odd)) == odd


def test_load_tokenizer_builtin_and_vocab_check():
    assert isinstance(load_tokenizer(make_cfg("tiny")), SentencePieceTokenizer)
    with pytest.raises(DataError, match="vocab_size 1024 > model.vocab_size 512"):
        load_tokenizer(make_cfg("tiny", "model.vocab_size=512"))
    with pytest.raises(DataError, match="tokenizer directory missing"):
        load_tokenizer(make_cfg("tiny", "data.tokenizer=/nonexistent/tok"))


def test_hf_tokenizer_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "cat": 4, "dog": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(tmp_path / "t5ish")
    tok = load_tokenizer(make_cfg("tiny", f"data.tokenizer={tmp_path / 't5ish'}"))
    assert isinstance(tok, HFTokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id) == (6, 0, 1, None)
    assert tok.encode("hello cat") == [3, 4]  # no eos appended
    assert tok.decode([3, 4, 1, 0, -100]) == "hello cat"
