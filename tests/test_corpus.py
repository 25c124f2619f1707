"""User corpora: text/JSONL/QA readers with one-line errors."""

import json

import pytest

from clue_jax.data import corpus
from clue_jax.errors import UserInputError
from clue_jax.eval import qa_file



def _texts(path):
    return [doc for _, doc in corpus.corpus_documents(path)]

def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_paragraphs(tmp_path):
    path = _write(tmp_path / "c.txt", "\n\nfirst doc\nstill first\n \n\n  second doc  \n\nthird")
    assert _texts(path) == ["first doc\nstill first", "second doc", "third"]


def test_jsonl_reading_and_errors(tmp_path):
    good = _write(tmp_path / "c.jsonl", json.dumps({"text": "a b"}) + "\n\n"
                  + json.dumps({"text": "c", "body": "x"}) + "\n")
    assert _texts(good) == ["a b", "c"]
    assert corpus.read_jsonl(good) == ["a b", "c"]
    with pytest.raises(UserInputError, match=r"c\.jsonl:1: missing field 'body'"):
        corpus.read_jsonl(good, field="body")
    bad = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(UserInputError, match=r"bad\.jsonl:2: malformed JSON"):
        _texts(bad)
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
        _texts(path)


def test_unreadable_or_unsupported(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(UserInputError, match=f"cannot read {missing}"):
        _texts(missing)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(UserInputError, match="not UTF-8"):
        _texts(binary)
    with pytest.raises(UserInputError, match="unsupported corpus format '.csv'"):
        _texts(_write(tmp_path / "c.csv", "a,b"))


def test_qa_jsonl(tmp_path):
    rows = [{"question": "Q1?", "answer": "A1", "name": "N", "extra": 1},
            {"question": "Q2?", "answer": "A2", "attribute": "major"}]
    path = _write(tmp_path / "qa.jsonl", "\n".join(json.dumps(r) for r in rows))
    assert qa_file.read_qa_file(path) == [
        {"question": "Q1?", "answer": "A1", "name": "N"},
        {"question": "Q2?", "answer": "A2", "attribute": "major"}]
    bad = _write(tmp_path / "qa_bad.jsonl", json.dumps(rows[0]) + "\n" + '{"question": "Q"}\n')
    with pytest.raises(UserInputError, match=r"qa_bad\.jsonl:2: missing field 'answer'"):
        qa_file.read_qa_file(bad)
    with pytest.raises(UserInputError, match="empty QA file"):
        qa_file.read_qa_file(_write(tmp_path / "qa_empty.jsonl", ""))
    with pytest.raises(UserInputError, match=r"qa_broken\.jsonl:1: malformed JSON"):
        qa_file.read_qa_file(_write(tmp_path / "qa_broken.jsonl", "{"))

