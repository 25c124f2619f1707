"""Rematerialisation: the Trainer runs with it, and every policy gives the same loss and gradients."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clue_jax.data.batching import ArrayBatchSource
from clue_jax.errors import UserInputError
from clue_jax.models import config as model_config
from clue_jax.models import encoder, layers
from clue_jax.models.causal_lm import CausalLM
from clue_jax.parallel import mesh
from clue_jax.train import defaults, loop, objectives

POLICIES = ("full", "dots")


def _lm(flavour="llama"):
    cfg = {
        "llama": model_config.llama(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64),
        "gemma2": model_config.gemma2(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                      mlp_dim=64, head_dim=8, sliding_window=4),
    }[flavour]
    return CausalLM(cfg, rngs=nnx.Rngs(0))


def _batch(b=2, t=12, vocab=64):
    ids = np.random.default_rng(0).integers(0, vocab, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    mask[1, 9:] = 0  # right padding
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}


def _loss_and_grads(model, loss_fn):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(p):
        return loss_fn(nnx.merge(graphdef, p, rest))

    return jax.jit(jax.value_and_grad(f))(params)


def _assert_same(a, b):
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)  # a sum of ~800 terms; a scanned step fuses differently
    for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1])):
        scale = max(1.0, float(np.abs(y).max()))  # reassociation error grows with the leaf's largest terms
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=max(2e-6, 5e-7 * scale))  # float reassociation only


@pytest.mark.parametrize("flavour", ["llama", "gemma2"])
def test_causal_lm_same_loss_and_grads(flavour):
    batch = _batch()
    loss = lambda m: objectives.causal_lm(m, batch)[0]
    reference = _loss_and_grads(_lm(flavour), loss)
    for policy in POLICIES:
        _assert_same(_loss_and_grads(layers.set_remat(_lm(flavour), policy), loss), reference)


def test_encoder_same_loss_and_grads_with_dropout():
    cfg = encoder.EncoderConfig(vocab_size=64, hidden_size=32, embedding_size=16, num_layers=2, num_heads=4,
                                intermediate_size=64, dropout=0.1)
    batch = _batch()
    key = jax.random.key(3)  # dropout inside the checkpointed layer must replay identically

    def loss(m):
        hidden = m(batch["input_ids"], batch["attention_mask"], dropout_key=key)
        return jnp.sum(jnp.sin(hidden) * batch["attention_mask"][..., None])

    reference = _loss_and_grads(encoder.Encoder(cfg, nnx.Rngs(0)), loss)
    for policy in POLICIES:
        _assert_same(_loss_and_grads(layers.set_remat(encoder.Encoder(cfg, nnx.Rngs(0)), policy), loss), reference)


def test_trainer_runs_with_remat(tmp_path):
    """The Trainer (jit + grad + donated state) used to fail with a TraceContextError under nnx.remat."""
    data = np.random.default_rng(0).integers(0, 64, (16, 12)).astype(np.int32)
    losses = {}
    for policy in ("none", "dots"):
        tcfg = defaults.train_config(steps=2, batch_size=4, log_every=1, checkpoint_every=100, remat=policy)
        trainer = loop.Trainer(_lm(), objectives.causal_lm, tcfg, mesh.make_mesh((1, 1, 1), jax.devices()[:1]),
                               str(tmp_path / policy))
        result = trainer.run(ArrayBatchSource({"input_ids": data, "attention_mask": np.ones_like(data)},
                                              batch_size=4, seed=0))
        assert result.status == "done" and result.model.remat == policy
        losses[policy] = result.metrics["loss"]
    np.testing.assert_allclose(losses["dots"], losses["none"], rtol=1e-5)


def test_bad_remat_is_one_line_error(tmp_path):
    with pytest.raises(UserInputError, match=r"^train.remat='sometimes' is not one of") as err:
        loop.Trainer(_lm(), objectives.causal_lm, defaults.train_config(remat="sometimes"),
                     mesh.make_mesh((1, 1, 1), jax.devices()[:1]), str(tmp_path))
    assert "\n" not in str(err.value)
    with pytest.raises(UserInputError, match=r"^model.remat='yes'"):
        model_config.llama(remat="yes")
    assert model_config.llama(remat=True).remat == "full"  # legacy bool configs still read


def test_remat_reaches_every_trained_stack_and_the_pod_recipe():
    cfg = encoder.EncoderConfig(vocab_size=64, hidden_size=32, embedding_size=16, num_layers=1, num_heads=4,
                                intermediate_size=64)
    pair = layers.set_remat(encoder.ElectraPair(cfg, encoder.generator_config(cfg, 0.5), nnx.Rngs(0)), "dots")
    bodies = [m for _, m in nnx.iter_graph(pair) if isinstance(m, encoder.EncoderBody)]
    assert len(bodies) == 2 and all(b.remat == "dots" for b in bodies)  # MCL trains generator and discriminator
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "llama3_pod.py")
    spec = importlib.util.spec_from_file_location("llama3_pod_for_remat", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.get_config("").cpt.remat == "full"  # the HF-loaded 8B student trains with remat
