"""The encoder's stacked layers under scan: layout, dropout per layer, old checkpoints, compile time vs depth."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from benchmarks import compile_depth_encoder as bench
from clue_jax.errors import UserInputError
from clue_jax.models import attention as attn
from clue_jax.models import encoder as E
from clue_jax.mcl import pairs as mcl_pairs
from clue_jax.parallel import rules as sharding
from clue_jax.train.checkpoint import Checkpointer
from clue_jax.parallel.mesh import make_mesh

CFG = E.EncoderConfig(vocab_size=64, hidden_size=32, embedding_size=16, num_layers=3, num_heads=4,
                      intermediate_size=64, max_len=32, dropout=0.3)


def _inputs():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
    mask = jnp.ones_like(ids).at[1, 8:].set(0)
    return ids, mask


def _per_layer(tree):
    """A pure-dict params tree in the old layout: every stacked `layers` dict split into layers/0, layers/1, ..."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for k, v in tree.items():
        if k == "layers":
            n = jax.tree.leaves(v)[0].shape[0]
            out[k] = {str(i): jax.tree.map(lambda a, i=i: a[i], v) for i in range(n)}
        else:
            out[k] = _per_layer(v)
    return out


def test_layers_are_one_stack_with_an_unsharded_layers_axis():
    model = E.Encoder(CFG, nnx.Rngs(0))
    flat = dict(nnx.to_flat_state(nnx.state(model.body.layers, nnx.Param)))
    assert flat[("query", "kernel")].get_value().shape == (3, 32, 32)
    assert flat[("query", "kernel")].get_metadata()["out_sharding"] == ("layers", "embed", "heads")
    kernels = flat[("intermediate", "kernel")].get_value()
    assert not np.allclose(kernels[0], kernels[1])  # split rngs: each layer has its own initialisation
    specs = sharding.state_shardings(nnx.state(model.body.layers, nnx.Param), make_mesh((1, 2, 4)))
    assert specs["intermediate"]["kernel"].get_value().spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def _same_layers(model):
    """Every layer gets layer 0's weights, so only the dropout keys can tell the layers apart."""
    state = nnx.state(model.body.layers, nnx.Param)
    nnx.update(model.body.layers, jax.tree.map(lambda a: jnp.broadcast_to(a[:1], a.shape), state))
    return model


def test_scan_equals_the_layer_loop_and_each_layer_has_its_own_dropout_key():
    model = _same_layers(E.Encoder(CFG, nnx.Rngs(0)))
    ids, mask = _inputs()
    key = jax.random.key(7)
    scanned = np.asarray(bench.scanned_hidden(model, ids, mask, key))
    np.testing.assert_allclose(scanned, np.asarray(bench.unrolled_hidden(model, ids, mask, key)), atol=1e-5)
    np.testing.assert_array_equal(scanned, np.asarray(bench.scanned_hidden(model, ids, mask, key)))  # deterministic

    x = model.body.embeddings_project(model.embeddings(ids))
    allowed = attn.allowed_keys(mask, causal=False)
    graphdef, state = nnx.split(model.body.layers)
    layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
    one_key = jax.random.split(key, 3)[0]
    for _ in range(3):  # identical layers with ONE shared dropout key: what the scan must not do
        x = layer(x, allowed, one_key)
    assert np.abs(scanned - np.asarray(x)).max() > 1e-2
    no_dropout = np.asarray(model.body(model.embeddings(ids), mask))
    assert np.abs(scanned - no_dropout).max() > 1e-2


def test_grads_reach_every_layer_of_the_stack():
    model = E.Encoder(CFG, nnx.Rngs(0))
    ids, mask = _inputs()
    grads = nnx.grad(lambda m: jnp.mean(jnp.sin(m(ids, mask, dropout_key=jax.random.key(1)))))(model)
    g = np.asarray(grads["body"]["layers"]["query"]["kernel"].get_value())
    assert g.shape == (3, 32, 32) and all(np.abs(g[i]).max() > 0 for i in range(3))


def test_trainer_checkpoint_in_the_per_layer_layout_is_refused(tmp_path):
    pair = E.ElectraPair(CFG, E.generator_config(CFG, 0.5), nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(pair, nnx.Param))
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=2, async_save=False)
    ckpt.save(4, {"params": _per_layer(params)}, {"model": {"x": 1}})
    ckpt.wait()
    expected = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), {"params": nnx.state(pair, nnx.Param)})
    with pytest.raises(UserInputError, match=r"checkpoint .*/4 has the old per-layer parameter layout "
                                             r"\(layers/0/\.\.\.\)") as err:
        ckpt.restore_latest(expected, {"model": {"x": 1}})
    assert "\n" not in str(err.value)
    assert ckpt.steps() == [4] and not (tmp_path / "checkpoints.damaged").exists()  # nothing set aside
    ckpt.close()


def test_saved_pair_in_the_per_layer_layout_is_refused(tmp_path):
    pair = E.ElectraPair(CFG, E.generator_config(CFG, 0.5), nnx.Rngs(0))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(str(tmp_path / "params"), _per_layer(nnx.to_pure_dict(nnx.state(pair, nnx.Param))))
    (tmp_path / "pair_config.json").write_text(json.dumps(
        {"discriminator": pair.disc_cfg.to_dict(), "generator": pair.gen_cfg.to_dict()}))
    with pytest.raises(UserInputError, match=r"model .*params has the old per-layer parameter layout .*stacks") as err:
        mcl_pairs.load_pair(str(tmp_path), make_mesh((1, 1, 1), jax.devices()[:1]))
    assert "\n" not in str(err.value)


def test_compile_time_does_not_grow_with_depth():
    """12 against 2 layers: the scan compiles one layer, so the ratio stays near 1.

    The bound is loose (2) because at this tiny width the compile is mostly
    the fixed part (embeddings, loss, scan set-up) and the 2 shared cores are
    loaded; an unrolled loop is about 3x here (benchmarks/compile_depth_encoder.py
    --smoke measures both), and grows linearly with depth at real widths.
    """
    result = bench.measure([2, 12], width=32, repeats=2, with_unrolled=False, seq=16)
    assert result["scan"]["ratio"] <= 2.0, result
