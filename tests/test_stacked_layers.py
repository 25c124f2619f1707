"""Stacked, scanned layers: same outputs as a per-layer loop, static Gemma-2 windows, old layouts refused."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from clue_jax.errors import UserInputError
from clue_jax.models import config as mc
from clue_jax.models import factory, layers, stacking
from clue_jax.models.causal_lm import CausalLM
from clue_jax.models import store
from clue_jax.train import checkpoint
from clue_jax.parallel.mesh import make_mesh

SMALL = dict(vocab_size=61, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=32)
CONFIGS = {
    "llama3": mc.llama(num_layers=3, **SMALL),
    "gemma2": mc.gemma2(num_layers=4, sliding_window=3, attn_logit_softcap=2.0, **SMALL),
}


def _per_layer_reference(model, ids, mask):
    """The forward pass as a Python loop over the unstacked layers (what the scan replaces)."""
    positions = layers.positions_from_mask(mask)
    x = model._embed(ids, positions)
    for unit in stacking.unstack(model.blocks):
        for block in unit.sublayers():
            x, _ = block(x, positions, mask)
    return model.embed_tokens.attend(model.final_norm(x)) if model.cfg.tie_embeddings else model.lm_head(
        model.final_norm(x))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_scan_equals_per_layer_loop(name):
    cfg = CONFIGS[name]
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    mask = jnp.ones_like(ids).at[1, :4].set(0)  # a left-padded row
    want = layers.softcap(_per_layer_reference(model, ids, mask).astype(jnp.float32), cfg.final_logit_softcap)
    np.testing.assert_allclose(np.asarray(model(ids, mask)), np.asarray(want), atol=2e-5, rtol=1e-5)


def test_unrolled_scan_gives_the_same_logits_scores_and_grads():
    import dataclasses
    cfg = CONFIGS["llama3"]
    ids = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab_size)
    loss = lambda m: jnp.mean(m(ids) ** 2)
    out = {}
    for unroll in (1, 3):
        model = CausalLM(dataclasses.replace(cfg, scan_unroll=unroll), rngs=nnx.Rngs(0))
        out[unroll] = (model(ids), model.received_attention_sums(ids)["colsum"],
                       jax.tree.leaves(nnx.grad(loss)(model)))
    for a, b in zip(jax.tree.leaves(out[1]), jax.tree.leaves(out[3])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    with pytest.raises(UserInputError, match=r"^model\.scan_unroll=0 must be an integer >= 1$"):
        dataclasses.replace(cfg, scan_unroll=0)


def test_gemma2_pairs_keep_static_alternating_windows():
    model = CausalLM(CONFIGS["gemma2"], rngs=nnx.Rngs(0))
    units = stacking.unstack(model.blocks)
    assert len(units) == 2  # 4 layers: 2 scanned (sliding, global) pairs
    windows = [block.attn.sliding_window for unit in units for block in unit.sublayers()]
    assert windows == [3 if CONFIGS["gemma2"].is_sliding_layer(i) else 0 for i in range(4)] == [3, 0, 3, 0]
    assert model.blocks.sliding.attn.q_proj.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "heads")


def test_odd_layers_with_windows_is_one_line_error():
    with pytest.raises(UserInputError, match=r"^model\.num_layers=3 must be even with model\.sliding_window=3[^\n]*$"):
        CausalLM(mc.gemma2(num_layers=3, sliding_window=3, **SMALL), rngs=nnx.Rngs(0))
    CausalLM(mc.gemma2(num_layers=3, sliding_window=0, **SMALL), rngs=nnx.Rngs(0))  # no windows: any depth


def _old_layout(state) -> dict:
    """A param tree as the per-layer layout saved it: blocks/<i>/... with one array per layer."""
    tree = nnx.to_pure_dict(state)
    stacked = tree.pop("blocks")
    n = jax.tree.leaves(stacked)[0].shape[0]
    tree["blocks"] = {str(i): jax.tree.map(lambda a: a[i], stacked) for i in range(n)}
    return tree


def test_old_layout_model_checkpoint_is_refused(tmp_path):
    cfg = CONFIGS["llama3"]
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "params", _old_layout(nnx.state(model, nnx.Param)))
    (tmp_path / "model_config.json").write_text(json.dumps(cfg.to_dict()))
    with pytest.raises(UserInputError, match=r"old per-layer parameter layout \(blocks/0/\.\.\.\)") as err:
        factory.load_params(str(tmp_path), make_mesh((1, 1, 1), jax.devices()[:1]))
    assert "\n" not in str(err.value) and str(tmp_path / "params") in str(err.value)
    factory.save_params(model, cfg, str(tmp_path / "new"))  # the stacked layout round-trips
    again, _ = factory.load_params(str(tmp_path / "new"), make_mesh((1, 1, 1), jax.devices()[:1]))
    np.testing.assert_array_equal(np.asarray(again.blocks.attn.q_proj.kernel[...]),
                                  np.asarray(model.blocks.attn.q_proj.kernel[...]))


def test_old_layout_train_checkpoint_is_refused_and_kept(tmp_path):
    cfg = CONFIGS["llama3"]
    params = nnx.state(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    ckpt.save(3, {"params": _old_layout(params), "step": jnp.int32(3)}, {"model": cfg.to_dict()})
    ckpt.wait()
    abstract = store.abstract_like({"params": nnx.to_pure_dict(params), "step": jnp.int32(0)})
    with pytest.raises(UserInputError, match=r"checkpoint .*/3 has the old per-layer parameter layout") as err:
        ckpt.restore_latest(abstract, {"model": cfg.to_dict()})
    assert "\n" not in str(err.value)
    assert ckpt.steps() == [3] and not (tmp_path / "checkpoints.damaged").exists()  # refused, not set aside
    ckpt.close()
