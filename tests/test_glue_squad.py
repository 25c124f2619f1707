"""GLUE and SQuAD 2.0 loaders on tfds mock data (no TensorFlow: the data-source path), and their encoding."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from clue_jax.data import glue_squad as G
from clue_jax.data.tokenizer import train_bpe_tokenizer
from clue_jax.errors import UserInputError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = ["abc def ghi jij", "a b c d e f g h i j", "hello world"] * 5
    return train_bpe_tokenizer(texts, 300, tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("task,split,n_labels", [("sst2", "train", 2), ("mnli", "dev", 3), ("stsb", "dev", 1),
                                                 ("qnli", "validation", 2)])
def test_glue_on_mock_data(tmp_path, tokenizer, task, split, n_labels):
    with tfds.testing.mock_data(num_examples=6):
        exs = G.load_glue(task, split, data_dir=tmp_path)
    assert len(exs) == 6 and len({ex.id for ex in exs}) == 6
    single = G.GLUE_TASKS[task].fields[1] is None
    for ex in exs:
        assert isinstance(ex.text_a, str) and (ex.text_b is None) == single
        if n_labels == 1:
            assert isinstance(ex.label, float)
        else:
            assert isinstance(ex.label, int) and 0 <= ex.label < n_labels
    arrays = G.encode_pair_examples(tokenizer, exs, 32, regression=n_labels == 1)
    assert arrays["input_ids"].shape == (6, 32) and arrays["labels"].shape == (6,)
    assert (arrays["input_ids"][:, 0] == tokenizer.bos_token_id).all()
    assert (arrays["token_type_ids"].sum(1) > 0).all() != single
    np.testing.assert_allclose(arrays["labels"], [ex.label for ex in exs])


def test_squad_v2_on_mock_data(tmp_path, tokenizer):
    with tfds.testing.mock_data(num_examples=5):
        exs = G.load_squad_v2("validation", data_dir=tmp_path, limit=4)
    assert len(exs) == 4
    for ex in exs:
        assert isinstance(ex.question, str) and isinstance(ex.context, str)
        assert len(ex.answers) == len(ex.answer_starts)
        assert all(isinstance(a, str) for a in ex.answers)
    arrays, offsets = G.encode_span_examples(tokenizer, exs, 48)
    assert offsets.shape == (4, 48, 2)
    for i in range(4):
        s, e = arrays["start_positions"][i], arrays["end_positions"][i]
        assert s == e == 0 or (0 < s <= e and arrays["context_mask"][i, s] == arrays["context_mask"][i, e] == 1)
        ctx = arrays["context_mask"][i] == 1
        assert (offsets[i][ctx] >= 0).all() and (offsets[i][~ctx] == -1).all()


def test_squad_maps_impossible_to_no_answers(tmp_path):
    with tfds.testing.mock_data(num_examples=12):
        exs = G.load_squad_v2("train", data_dir=tmp_path)
        source = tfds.builder("squad/v2.0", data_dir=tmp_path).as_data_source("train")
        rows = [source[i] for i in range(len(source))]
    flags = [bool(np.asarray(r["is_impossible"]).item()) for r in rows]
    assert any(flags) and not all(flags)  # the mock draws both kinds
    for flag, row, ex in zip(flags, rows, exs):
        n_raw = min(len(np.atleast_1d(row["answers"]["text"])), len(np.atleast_1d(row["answers"]["answer_start"])))
        assert len(ex.answers) == (0 if flag else n_raw)  # plausible answers of impossible questions dropped


def test_missing_data_and_bad_names(tmp_path):
    with pytest.raises(G.DataNotPrepared, match=r"glue/rte.*not available.*tfds build glue"):
        G.load_glue("rte", "train", data_dir=tmp_path)
    with pytest.raises(UserInputError, match="GLUE task 'nope'"):
        G.load_glue("nope", "train", data_dir=tmp_path)
    with pytest.raises(G.DataNotPrepared, match="squad/v2.0"):
        G.load_squad_v2("validation", data_dir=tmp_path)
