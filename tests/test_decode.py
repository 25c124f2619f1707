"""Greedy decoding and continuation scoring against exact references from tiny fake LMs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clue_jax.errors import UserInputError
from clue_jax.eval import decode

V = 11


def make_position_lm(counter):
    """Next token = (token + position) % V, positions from the mask as the real models do.

    Depends on positions, so wrong left-padding handling changes the output.
    `counter` counts traces (the Python body only runs while tracing).
    """

    def logits_fn(ids, mask):
        counter.append(1)
        pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        return 5.0 * jax.nn.one_hot((ids + pos) % V, V)

    return logits_fn


def reference_decode(prompt, n, stops=(), fill=-1):
    seq, out, done = list(prompt), [], False
    for _ in range(n):
        nxt = (seq[-1] + len(seq) - 1) % V
        seq.append(nxt)
        out.append(fill if done else nxt)
        done = done or nxt in stops
    return out


PROMPTS = [[3], [1, 4, 1, 5], [9, 2], [7, 7, 7], [10, 0, 6, 2, 2]]


def test_left_pad():
    ids, mask = decode.left_pad([[5, 6], [7]], pad_id=0, length=3)
    np.testing.assert_array_equal(ids, [[0, 5, 6], [0, 0, 7]])
    np.testing.assert_array_equal(mask, [[0, 1, 1], [0, 0, 1]])
    assert ids.dtype == np.int32
    with pytest.raises(UserInputError, match="sequence 0 has 2 tokens"):
        decode.left_pad([[5, 6]], pad_id=0, length=1)
    with pytest.raises(UserInputError, match="sequence 1 is empty"):
        decode.left_pad([[5], []], pad_id=0)


def test_greedy_matches_reference_and_compiles_once():
    counter = []
    fn = make_position_lm(counter)
    ids, mask = decode.left_pad(PROMPTS, pad_id=0)
    out = decode.greedy_decode(fn, ids, mask, max_new_tokens=6, batch_size=2)
    assert out.shape == (len(PROMPTS), 6) and out.dtype == np.int32
    np.testing.assert_array_equal(out, [reference_decode(p, 6) for p in PROMPTS])
    traces = len(counter)
    assert traces >= 1
    # Three chunks above, and another call with equal shapes: no new trace.
    out2 = decode.greedy_decode(fn, ids[::-1].copy(), mask[::-1].copy(), max_new_tokens=6, batch_size=2)
    np.testing.assert_array_equal(out2, out[::-1])
    assert len(counter) == traces
    # Extra left padding changes nothing.
    ids_w, mask_w = decode.left_pad(PROMPTS, pad_id=0, length=9)
    np.testing.assert_array_equal(decode.greedy_decode(fn, ids_w, mask_w, max_new_tokens=6), out)


def test_stop_tokens_fill_the_rest():
    fn = make_position_lm([])
    ids, mask = decode.left_pad(PROMPTS, pad_id=0)
    out = decode.greedy_decode(fn, ids, mask, max_new_tokens=8, eos_id=4, stop_ids=(8,))
    expected = [reference_decode(p, 8, stops=(4, 8)) for p in PROMPTS]
    np.testing.assert_array_equal(out, expected)
    assert (out == -1).any(), "the test prompts must hit a stop token"
    # The stop token itself is kept, and everything after it is fill.
    for row in out:
        hits = np.flatnonzero(np.isin(row, (4, 8)))
        if hits.size:
            assert np.all(row[hits[0] + 1:] == -1)


def test_right_padded_prompts_are_refused():
    with pytest.raises(ValueError, match="LEFT-padded"):
        decode.greedy_decode(make_position_lm([]), np.array([[1, 0]]), np.array([[1, 0]]))


class Bigram(nnx.Module):
    """A real NNX module: logits = table[token]."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(V, V, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, positions=None):
        return self.embed(input_ids)


def test_model_logits_fn_sees_weight_updates_without_recompiling():
    model = Bigram(nnx.Rngs(0))
    succ = (np.arange(V) + 3) % V
    model.embed.embedding[...] = jnp.asarray(np.eye(V)[succ] * 4.0, jnp.float32)
    ids, mask = decode.left_pad([[1], [2, 5]], pad_id=0)
    before = decode.greedy_decode(decode.model_logits_fn(model), ids, mask, max_new_tokens=3)
    np.testing.assert_array_equal(before, [[4, 7, 10], [8, 0, 3]])
    jitted = decode._greedy_jit._cache_size()
    model.embed.embedding[...] = jnp.asarray(np.eye(V)[(np.arange(V) + 1) % V] * 4.0, jnp.float32)
    after = decode.greedy_decode(decode.model_logits_fn(model), ids, mask, max_new_tokens=3)
    np.testing.assert_array_equal(after, [[2, 3, 4], [6, 7, 8]])
    assert decode._greedy_jit._cache_size() == jitted


class FakeTokenizer:
    pieces = {0: "a", 1: " b", 2: "\n", 3: "c ", 4: "<eos>"}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i == 4))


def test_decode_to_text_cuts_and_strips():
    gen = np.array([[1, 0, 2, 3], [3, 1, 4, -1], [2, 0, -1, -1]])
    assert decode.decode_to_text(FakeTokenizer(), gen) == ["ba", "c  b", ""]
    assert decode.decode_to_text(FakeTokenizer(), gen, cut_at=None) == ["ba\nc", "c  b", "a"]


def test_decode_to_text_with_a_real_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["Answer: Paris\n\nAnswer: Rome\n"] * 3, trainers.BpeTrainer(vocab_size=300))
    ids = tok.encode(" Paris\nAnswer:").ids
    gen = np.array([ids + [-1, -1]])
    assert decode.decode_to_text(tok, gen) == ["Paris"]


def random_bigram(seed):
    table = jax.random.normal(jax.random.PRNGKey(seed), (V, V))

    def logits_fn(ids, mask):
        return table[ids]

    return table, logits_fn


def test_score_continuations_matches_bruteforce():
    table, fn = random_bigram(0)
    logp = np.asarray(jax.nn.log_softmax(table, axis=-1))
    prompts = [[1, 2], [3], [4, 5, 6], [0]]
    conts = [[7, 8], [9], [], [2, 2, 2]]
    got = decode.score_continuations(fn, prompts, conts, pad_id=0, batch_size=3)
    want = []
    for p, c in zip(prompts, conts):
        seq = p + c
        want.append(sum(logp[seq[j - 1], seq[j]] for j in range(len(p), len(seq))))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert got[2] == 0.0
    with pytest.raises(UserInputError, match="prompt 0 is empty"):
        decode.score_continuations(fn, [[]], [[1]], pad_id=0)


def test_nnx_module_passed_directly_is_not_baked_in():
    model = Bigram(nnx.Rngs(1))
    model.embed.embedding[...] = jnp.asarray(np.eye(V)[(np.arange(V) + 2) % V] * 4.0, jnp.float32)
    ids, mask = decode.left_pad([[0]], pad_id=0)
    np.testing.assert_array_equal(decode.greedy_decode(model, ids, mask, max_new_tokens=2), [[2, 4]])
    model.embed.embedding[...] = jnp.asarray(np.eye(V)[(np.arange(V) + 5) % V] * 4.0, jnp.float32)
    np.testing.assert_array_equal(decode.greedy_decode(model, ids, mask, max_new_tokens=2), [[5, 10]])
