"""User corpora: text/JSONL/QA readers with one-line errors, tfds text, per-host shards."""

import json

import pytest
import tensorflow_datasets as tfds

from clue_jax.data import corpus
from clue_jax.data import tfds_bios  # noqa: F401  (registers clue_bios)
from clue_jax.errors import UserInputError


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_paragraphs(tmp_path):
    path = _write(tmp_path / "c.txt", "\n\nfirst doc\nstill first\n \n\n  second doc  \n\nthird")
    assert corpus.read_text_corpus(path) == ["first doc\nstill first", "second doc", "third"]


def test_jsonl_reading_and_errors(tmp_path):
    good = _write(tmp_path / "c.jsonl", json.dumps({"text": "a b"}) + "\n\n"
                  + json.dumps({"text": "c", "body": "x"}) + "\n")
    assert corpus.read_text_corpus(good) == ["a b", "c"]
    assert corpus.read_jsonl(good) == ["a b", "c"]
    with pytest.raises(UserInputError, match=r"c\.jsonl:1: missing field 'body'"):
        corpus.read_jsonl(good, field="body")
    bad = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(UserInputError, match=r"bad\.jsonl:2: malformed JSON"):
        corpus.read_text_corpus(bad)
    typed = _write(tmp_path / "typed.jsonl", '{"text": 3}\n')
    with pytest.raises(UserInputError, match=r"typed\.jsonl:1: field 'text' must be a string"):
        corpus.read_jsonl(typed)
    listed = _write(tmp_path / "list.jsonl", '["text"]\n')
    with pytest.raises(UserInputError, match=r"list\.jsonl:1: expected a JSON object"):
        corpus.read_jsonl(listed)


@pytest.mark.parametrize("name,content", [("e.txt", "\n  \n"), ("e.jsonl", "\n")])
def test_empty_corpus(tmp_path, name, content):
    path = _write(tmp_path / name, content)
    with pytest.raises(UserInputError, match=f"empty corpus: {path}"):
        corpus.read_text_corpus(path)


def test_unreadable_or_unsupported(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(UserInputError, match=f"cannot read {missing}"):
        corpus.read_text_corpus(missing)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(UserInputError, match="not UTF-8"):
        corpus.read_text_corpus(binary)
    with pytest.raises(UserInputError, match="unsupported corpus format '.csv'"):
        corpus.read_text_corpus(_write(tmp_path / "c.csv", "a,b"))


def test_qa_jsonl(tmp_path):
    rows = [{"question": "Q1?", "answer": "A1", "name": "N", "extra": 1},
            {"question": "Q2?", "answer": "A2", "attribute": "major"}]
    path = _write(tmp_path / "qa.jsonl", "\n".join(json.dumps(r) for r in rows))
    assert corpus.read_qa_jsonl(path) == [
        {"question": "Q1?", "answer": "A1", "name": "N"},
        {"question": "Q2?", "answer": "A2", "attribute": "major"}]
    bad = _write(tmp_path / "qa_bad.jsonl", json.dumps(rows[0]) + "\n" + '{"question": "Q"}\n')
    with pytest.raises(UserInputError, match=r"qa_bad\.jsonl:2: missing field 'answer'"):
        corpus.read_qa_jsonl(bad)
    with pytest.raises(UserInputError, match="empty QA file"):
        corpus.read_qa_jsonl(_write(tmp_path / "qa_empty.jsonl", ""))
    with pytest.raises(UserInputError, match=r"qa_broken\.jsonl:1: malformed JSON"):
        corpus.read_qa_jsonl(_write(tmp_path / "qa_broken.jsonl", "{"))


def test_load_tfds_text_from_a_real_builder(tmp_path):
    names = corpus.load_tfds_text("clue_bios/tiny", "new", "name", data_dir=tmp_path)
    assert len(names) == 10 and all(isinstance(n, str) and n for n in names)
    part = corpus.load_tfds_text("clue_bios/tiny", corpus.tfds_split_for_process("new", 1, 3),
                                 "name", data_dir=tmp_path)
    assert part == names[3:6]
    with pytest.raises(UserInputError, match=r"has no field 'text'; available fields: \['bio'"):
        corpus.load_tfds_text("clue_bios/tiny", "new", "text", data_dir=tmp_path)
    with pytest.raises(UserInputError, match="split 'test'"):
        corpus.load_tfds_text("clue_bios/tiny", "test", "bio", data_dir=tmp_path)
    with pytest.raises(UserInputError, match="no_such_dataset"):
        corpus.load_tfds_text("no_such_dataset", "train", "text", data_dir=tmp_path)


def test_load_tfds_text_with_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=5):
        texts = corpus.load_tfds_text("clue_bios/tiny", "background", "bio", data_dir=tmp_path)
    assert len(texts) == 5 and all(isinstance(t, str) for t in texts)


def test_host_shard_equal_disjoint_shares():
    items = list(range(11))
    shares = [corpus.host_shard(items, i, 3) for i in range(3)]
    assert shares == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert corpus.host_shard(items, 0, 1) == items
    with pytest.raises(ValueError):
        corpus.host_shard(items, 3, 3)
    with pytest.raises(UserInputError, match="cannot be split over 4"):
        corpus.host_shard([1, 2], 0, 4)
