"""Pretraining corpus: text / jsonl through datasets, packing, the built-in corpus, spec parsing."""

import json

import pytest

from tagi_ds.config import DataConfig
from tagi_ds.data.builtin import builtin_suite
from tagi_ds.data.corpus import builtin_documents, corpus_files, iter_documents, load_windows, pack
from tagi_ds.data.spec import DataSpec, corpus_source, parse_spec
from tagi_ds.data.task import DataError


def test_text_and_jsonl_files_in_sorted_order(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "third doc", "meta": 1}) + "\n")
    (tmp_path / "a.txt").write_text("first doc\n\n   \nsecond doc\n")
    (tmp_path / "skip.md").write_text("not a corpus file\n")
    files = corpus_files(tmp_path)
    assert [f.name for f in files] == ["a.txt", "b.jsonl"]
    assert list(iter_documents(files)) == ["first doc", "second doc", "third doc"]


def test_packing_joins_documents_with_eos(tok):
    docs = ["cat dog", "red blue green"]
    ids = [*tok.encode(docs[0]), tok.eos_id, *tok.encode(docs[1]), tok.eos_id]
    windows = list(pack(docs, tok, 3))
    assert windows == [ids[i : i + 3] for i in range(0, len(ids) - len(ids) % 3, 3)]


def test_load_windows_from_a_file(tmp_path, tok):
    path = tmp_path / "c.txt"
    path.write_text("\n".join(builtin_documents()[-50:]) + "\n")
    windows = load_windows(path, tok, 32)
    assert windows.shape[1] == 32 and windows.shape[0] > 20 and int(windows.max()) < tok.vocab_size
    with pytest.raises(DataError, match="fewer than data.pretrain_length=100000"):
        load_windows(path, tok, 100_000)


def test_builtin_corpus_is_deterministic_and_leaves_test_tasks_out():
    docs = builtin_documents()
    assert docs == builtin_documents() and len(docs) > 3000
    text = "\n".join(docs)
    assert all(d not in text for task in builtin_suite(0)["test"] for d in task.definitions)
    assert all(d in text for task in builtin_suite(0)["train"] for d in task.definitions)


def test_spec_parsing_and_corpus_source(tmp_path):
    (tmp_path / "c.txt").write_text("x\n")
    assert parse_spec("builtin") == DataSpec("builtin")
    assert parse_spec(f"sni:{tmp_path}") == DataSpec("sni", tmp_path)
    assert str(parse_spec(f"text:{tmp_path / 'c.txt'}")) == f"text:{tmp_path / 'c.txt'}"
    with pytest.raises(DataError, match="is not a directory"):
        parse_spec(f"p3:{tmp_path / 'c.txt'}")
    with pytest.raises(DataError, match="missing the path"):
        parse_spec("sni:")
    assert corpus_source(DataConfig()) is None
    assert corpus_source(DataConfig(spec=f"text:{tmp_path}")) == tmp_path
    assert corpus_source(DataConfig(spec="builtin", corpus=f"text:{tmp_path}")) == tmp_path
    with pytest.raises(DataError, match="expected builtin or text"):
        corpus_source(DataConfig(corpus=f"sni:{tmp_path}"))
