"""The detection-AUC metric: one fixed reference corruption; AUC of a perfect and a constant discriminator."""

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from clue_jax.mcl import intrinsic
from clue_jax.mcl import objective as O
from clue_jax.models.encoder import ElectraPair, EncoderConfig, generator_config

BOS, EOS, PAD, MASK = 0, 1, 2, 3
CFG = EncoderConfig(vocab_size=40, hidden_size=16, embedding_size=16, num_layers=1, num_heads=2,
                    intermediate_size=32, max_len=16)
OBJ = O.ObjectiveConfig(mask_id=MASK, protected_ids=(BOS, EOS), banned_ids=(BOS, EOS, PAD, MASK), mask_rate=0.3)


def _heldout():
    ids = np.random.default_rng(0).integers(4, 40, (10, 12)).astype(np.int32)
    ids[:, 0], ids[:, -1] = BOS, EOS
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


class _Oracle:
    """A 'discriminator' that knows the truth (perfect), or says the same for every token (constant)."""

    def __init__(self, original, constant=False):
        self.original, self.constant = original, constant

    def discriminator_logits(self, ids, mask, types):
        if self.constant:
            return jnp.zeros(ids.shape)
        return jnp.where(ids != self.original[:ids.shape[0]], 5.0, -5.0)


def test_reference_corruption_is_fixed_and_the_auc_bounds(monkeypatch):
    pair = ElectraPair(CFG, generator_config(CFG, 0.5), nnx.Rngs(0))
    held = _heldout()
    ref = intrinsic.reference_corruption(pair, held, OBJ, seed=1, batch_size=4)
    again = intrinsic.reference_corruption(pair, held, OBJ, seed=1, batch_size=4)
    np.testing.assert_array_equal(ref["input_ids"], again["input_ids"])
    np.testing.assert_array_equal(ref["labels"], (ref["input_ids"] != held["input_ids"]).astype(np.int32))
    assert ref["labels"].sum() > 5 and not ref["labels"][:, [0, -1]].any() and not ref["scored"][:, [0, -1]].any()
    assert not np.isin(ref["input_ids"][ref["labels"] > 0], [BOS, EOS, PAD, MASK]).any()
    # the oracles are plain objects: call the metric's logits function unjitted
    monkeypatch.setattr(intrinsic, "_disc_logits", lambda m, ids, mask, types: m.discriminator_logits(ids, mask, types))
    assert intrinsic.detection_auc(_Oracle(jnp.asarray(held["input_ids"])), ref, batch_size=10) == 1.0
    assert intrinsic.detection_auc(_Oracle(None, constant=True), ref) == 0.5
    auc = intrinsic.detection_auc(pair, ref, batch_size=4)  # an untrained D: somewhere in between
    assert 0.0 <= auc <= 1.0
    other = intrinsic.reference_corruption(pair, held, dataclasses.replace(OBJ, mask_rate=0.5), seed=1)
    assert other["labels"].sum() > ref["labels"].sum()
