"""Bidirectional ELECTRA encoder: head shapes, bidirectionality, shared embeddings, losses vs numpy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clue_jax.errors import UserInputError
from clue_jax.models import encoder as E, encoder_losses as L

CFG = E.EncoderConfig(
    vocab_size=100, hidden_size=32, embedding_size=16, num_layers=2, num_heads=4, intermediate_size=64, max_len=32,
    dropout=0.1,  # inactive unless a dropout_key is passed
)
B, T = 2, 8
GEN_CFG = E.generator_config(CFG, 0.5)  # hidden 16 = embedding_size: no projection


def _batch(seed=0):
    ids = jax.random.randint(jax.random.key(seed), (B, T), 4, CFG.vocab_size)
    mask = jnp.ones((B, T), jnp.int32).at[1, 5:].set(0)
    return ids, mask


@pytest.fixture(scope="module")
def pair():
    """One pair for the module (model construction dominates these tests' time)."""
    return E.ElectraPair(CFG, GEN_CFG, nnx.Rngs(2))


def test_head_shapes(pair):
    ids, mask = _batch()
    rngs = nnx.Rngs(0)
    enc = pair.discriminator_model().encoder
    assert isinstance(enc, E.Encoder)
    hidden = enc(ids, mask, jnp.zeros_like(ids))
    assert hidden.shape == (B, T, CFG.hidden_size)
    start, end = E.SpanQAHead(CFG, rngs)(hidden)
    assert start.shape == end.shape == (B, T)
    assert E.ClassificationHead(CFG, 3, rngs)(hidden).shape == (B, 3)
    assert E.MaskedLMHead(CFG, rngs)(hidden, enc.embeddings.word_embeddings).shape == (B, T, CFG.vocab_size)
    assert E.DiscriminatorHead(CFG, rngs)(hidden).dtype == jnp.float32
    assert pair.generator_logits(ids, mask).shape == (B, T, CFG.vocab_size)
    assert pair.discriminator_logits(ids, mask).shape == (B, T)
    assert pair.generator_model()(ids, mask).shape == (B, T, CFG.vocab_size)
    assert pair.discriminator_model()(ids, mask).shape == (B, T)


def test_bidirectional_and_padding_ignored(pair):
    enc = pair.discriminator_model().encoder
    ids, mask = _batch()
    base = enc(ids, mask)
    later = enc(ids.at[0, T - 1].set((ids[0, T - 1] + 1) % CFG.vocab_size), mask)
    # A later token changes the first position's state (a causal model would not).
    assert not np.allclose(base[0, 0], later[0, 0], atol=1e-6)
    # Row 1's padding (positions 5..7) is invisible to its real positions.
    padded = enc(ids.at[1, 6].set((ids[1, 6] + 1) % CFG.vocab_size), mask)
    np.testing.assert_allclose(padded[1, :5], base[1, :5], atol=1e-6)
    assert not np.allclose(padded[1, 6], base[1, 6], atol=1e-6)


def test_too_long_sequence_is_user_error(pair):
    with pytest.raises(UserInputError, match="max_len"):
        pair.discriminator_logits(jnp.zeros((1, CFG.max_len + 1), jnp.int32))


def _embedding_tables(module):
    """Paths of every embedding table parameter in the module's state."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return sorted("/".join(map(str, p)) for p, _ in flat if p[-1] == "embedding")


def test_pair_shares_one_embedding_table(pair):
    assert _embedding_tables(pair) == [
        f"embeddings/{name}/embedding" for name in ("position_embeddings", "token_type_embeddings", "word_embeddings")
    ]
    ids, mask = _batch()
    labels = (jnp.arange(T)[None] % 3 == 0).astype(jnp.int32) * mask

    @nnx.jit
    def grads(p):
        """Each loss's gradient on the shared word table (jitted: eager backward passes are slow)."""
        def mlm(m):
            return L.mlm_loss(m.generator_logits(ids, mask), ids, mask)

        def rtd(m):
            return L.rtd_loss(m.discriminator_logits(ids, mask), labels, mask)

        table = lambda g: g["embeddings"]["word_embeddings"]["embedding"][...]
        return table(nnx.grad(mlm)(p)), table(nnx.grad(rtd)(p))

    g_mlm, g_rtd = grads(pair)
    assert np.abs(g_mlm).sum() > 0 and np.abs(g_rtd).sum() > 0
    assert not np.allclose(g_mlm, g_rtd)
    gen0, disc0 = pair.generator_logits(ids, mask), pair.discriminator_logits(ids, mask)
    table = pair.embeddings.word_embeddings.embedding
    old = table[...]
    table[...] = old + jax.random.normal(jax.random.key(9), old.shape)
    gen1, disc1 = pair.generator_logits(ids, mask), pair.discriminator_logits(ids, mask)
    table[...] = old
    assert not np.allclose(gen0, gen1, atol=1e-5)
    assert not np.allclose(disc0, disc1, atol=1e-5)


def test_pair_exports_match_and_are_copies(pair):
    ids, mask = _batch()
    disc, gen = pair.discriminator_model(), pair.generator_model()
    np.testing.assert_allclose(disc(ids, mask), pair.discriminator_logits(ids, mask), atol=1e-6)
    np.testing.assert_allclose(gen(ids, mask), pair.generator_logits(ids, mask), atol=1e-6)
    disc.encoder.embeddings.word_embeddings.embedding[...] *= 0.0
    assert np.abs(np.asarray(pair.embeddings.word_embeddings.embedding[...])).sum() > 0


def test_pair_rejects_mismatched_generator():
    with pytest.raises(UserInputError, match="embedding_size"):
        E.ElectraPair(CFG, dataclasses.replace(CFG, embedding_size=8), nnx.Rngs(0))


def test_dropout_only_with_a_key(pair):
    ids, mask = _batch()
    a, b = pair.discriminator_logits(ids, mask), pair.discriminator_logits(ids, mask)
    np.testing.assert_array_equal(a, b)
    d1 = pair.discriminator_logits(ids, mask, dropout_key=jax.random.key(1))
    d2 = pair.discriminator_logits(ids, mask, dropout_key=jax.random.key(2))
    assert not np.allclose(d1, a) and not np.allclose(d1, d2)


# ----------------------------------------------------------------------------- config


def test_config_dict_round_trip_and_unknown_keys():
    assert E.EncoderConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(UserInputError, match=r"hiden_size.*valid keys.*hidden_size"):
        E.EncoderConfig.from_dict({"hiden_size": 8})
    with pytest.raises(UserInputError, match="num_heads"):
        E.EncoderConfig(hidden_size=30, num_heads=4)


def test_generator_config_fractions():
    base = E.EncoderConfig(hidden_size=768, embedding_size=768, num_heads=12, intermediate_size=3072)
    g = E.generator_config(base, 1 / 3)
    assert (g.hidden_size, g.num_heads, g.intermediate_size, g.embedding_size) == (256, 4, 1024, 768)
    small = E.EncoderConfig(hidden_size=256, embedding_size=128, num_heads=4, intermediate_size=1024)
    g = E.generator_config(small, 0.25)
    assert (g.hidden_size, g.num_heads, g.intermediate_size, g.embedding_size) == (64, 1, 256, 128)
    with pytest.raises(UserInputError, match="width_fraction"):
        E.generator_config(small, 0.0)


# ----------------------------------------------------------------------------- losses


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_mlm_loss_matches_numpy():
    logits = np.array([[[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], [[1.0, 1.0, 1.0], [-2.0, 3.0, 0.0]]], np.float32)
    targets = np.array([[0, 2], [1, 1]])
    weights = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)
    nll = -np.take_along_axis(_log_softmax(logits), targets[..., None], -1)[..., 0]
    expected = (nll * weights).sum() / weights.sum()
    got = L.mlm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert float(L.mlm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.zeros((2, 2)))) == 0.0


def test_rtd_and_electra_loss_match_numpy():
    logits = np.array([[1.5, -0.5, 0.0], [2.0, -3.0, 0.7]], np.float32)
    labels = np.array([[1, 0, 1], [0, 0, 1]])
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    p = 1 / (1 + np.exp(-logits))
    bce = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    rtd = (bce * mask).sum() / mask.sum()
    np.testing.assert_allclose(L.rtd_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask)), rtd, rtol=1e-5)

    gen_logits = np.array([[[0.3, -0.2], [1.0, 0.0], [0.5, 0.5]]] * 2, np.float32)
    targets = np.array([[1, 0, 1], [0, 1, 0]])
    w = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
    nll = -np.take_along_axis(_log_softmax(gen_logits), targets[..., None], -1)[..., 0]
    mlm = (nll * w).sum() / w.sum()
    total, parts = L.electra_loss(
        jnp.asarray(gen_logits), jnp.asarray(targets), jnp.asarray(w),
        jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask),
    )
    np.testing.assert_allclose(parts["mlm"], mlm, rtol=1e-5)
    np.testing.assert_allclose(total, mlm + 50.0 * rtd, rtol=1e-5)
    total7, _ = L.electra_loss(
        jnp.asarray(gen_logits), jnp.asarray(targets), jnp.asarray(w),
        jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), disc_weight=7.0,
    )
    np.testing.assert_allclose(total7, mlm + 7.0 * rtd, rtol=1e-5)


def test_span_qa_loss_matches_numpy_and_ignores_padding():
    start = np.array([[0.5, 2.0, -1.0, 9.0], [3.0, 0.0, 0.1, 0.2]], np.float32)
    end = np.array([[0.0, 0.3, 1.0, 9.0], [1.0, 0.5, 0.2, -0.2]], np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    sp, ep = np.array([1, 0]), np.array([2, 0])  # example 2 is unanswerable: (CLS, CLS)
    ls = _log_softmax(np.where(mask > 0, start, -np.inf))
    le = _log_softmax(np.where(mask > 0, end, -np.inf))
    per = -(ls[np.arange(2), sp] + le[np.arange(2), ep]) / 2
    got = L.span_qa_loss(jnp.asarray(start), jnp.asarray(end), jnp.asarray(sp), jnp.asarray(ep), jnp.asarray(mask))
    np.testing.assert_allclose(got, per.mean(), rtol=1e-5)
    weighted = L.span_qa_loss(
        jnp.asarray(start), jnp.asarray(end), jnp.asarray(sp), jnp.asarray(ep), jnp.asarray(mask), jnp.array([0.0, 1.0])
    )
    np.testing.assert_allclose(weighted, per[1], rtol=1e-5)


def test_classification_loss_matches_numpy():
    logits = np.array([[1.0, -1.0, 0.5], [0.0, 2.0, 0.1]], np.float32)
    labels = np.array([2, 1])
    ce = -_log_softmax(logits)[np.arange(2), labels]
    np.testing.assert_allclose(L.classification_loss(jnp.asarray(logits), jnp.asarray(labels)), ce.mean(), rtol=1e-6)
    reg = np.array([[0.5], [2.0]], np.float32)
    target = np.array([1.0, 1.5], np.float32)
    np.testing.assert_allclose(
        L.classification_loss(jnp.asarray(reg), jnp.asarray(target)), ((reg[:, 0] - target) ** 2).mean(), rtol=1e-6
    )
