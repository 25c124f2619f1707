"""Causal LM flavours: causality, padding invariance, blocked scoring == plain attention, dtypes, sharding names."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clue_jax.errors import UserInputError
from clue_jax.models import config as C
from clue_jax.models.causal_lm import CausalLM
from clue_jax.parallel import mesh as mesh_lib, rules as sharding

FLAVOURS = {
    "gpt2": C.gpt2(vocab_size=50, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=32),
    "llama": C.llama(vocab_size=50, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                     rope_scaling=(8.0, 1.0, 4.0, 16)),
    "gemma2": C.gemma2(vocab_size=50, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                       mlp_dim=64, sliding_window=3, query_pre_attn_scalar=16),
}


@pytest.fixture(params=sorted(FLAVOURS))
def model(request):
    return CausalLM(FLAVOURS[request.param], rngs=nnx.Rngs(0))


def _ids(b=2, t=10, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, 50, (b, t)), jnp.int32)


def test_causal_future_tokens_do_not_matter(model):
    ids = _ids()
    changed = ids.at[:, 6:].set(7)
    a, b = model(ids), model(changed)
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-5)
    assert not np.allclose(a[:, 6:], b[:, 6:])


def test_left_padding_gives_same_logits(model):
    ids = _ids(1, 8)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), ids], axis=1)
    mask = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 8), jnp.int32)], axis=1)
    np.testing.assert_allclose(model(ids), model(padded, mask)[:, 3:], atol=1e-5)


def test_scoring_path_returns_the_same_hidden_flow(model):
    """The blocked scoring pass must compute the same attention: its column sums add up to
    (#layers x #heads) per real query, and its output equals the fast path's (checked via row sums)."""
    ids = _ids(2, 11)
    mask = jnp.asarray([[1] * 11, [1] * 7 + [0] * 4], jnp.int32)
    out = model.received_attention_sums(ids, mask, query_block=4, query_index=jnp.asarray([10, 6]))
    heads_layers = model.cfg.num_layers * model.cfg.num_heads
    np.testing.assert_allclose(out["colsum"].sum(-1), mask.sum(-1) * heads_layers, rtol=1e-5)
    np.testing.assert_allclose(out["row"].sum(-1), heads_layers, rtol=1e-5)
    assert np.all(np.asarray(out["colsum"])[1, 7:] == 0)


def test_bfloat16_compute_and_params():
    cfg = C.llama(vocab_size=50, d_model=32, num_layers=1, num_heads=4, mlp_dim=64, dtype="bfloat16",
                  param_dtype="bfloat16")
    m = CausalLM(cfg, rngs=nnx.Rngs(0))
    assert nnx.state(m, nnx.Param)["blocks"]["attn"]["q_proj"]["kernel"].get_value().dtype == jnp.bfloat16
    logits = m(_ids())
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_every_parameter_has_logical_names():
    m = CausalLM(FLAVOURS["llama"], rngs=nnx.Rngs(0))
    for path, var in jax.tree_util.tree_leaves_with_path(nnx.state(m, nnx.Param),
                                                         is_leaf=lambda x: isinstance(x, nnx.Variable)):
        names = var.get_metadata().get("out_sharding")
        assert names and len(names) == var.get_value().ndim, jax.tree_util.keystr(path)


def test_state_shardings_follow_rules_and_skip_indivisible_dims():
    cfg = C.llama(vocab_size=51, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=64)
    m = CausalLM(cfg, rngs=nnx.Rngs(0))
    mesh = mesh_lib.make_mesh((2, 2, 2))
    sh = sharding.state_shardings(nnx.state(m, nnx.Param), mesh)
    q = sh["blocks"]["attn"]["q_proj"]["kernel"].get_value()
    assert tuple(q.spec) == (None, "fsdp", "tensor")  # the stacked layers axis maps to no mesh axis
    emb = sh["embed_tokens"]["embedding"].get_value()  # vocab 51 is not divisible by tensor=2
    assert tuple(emb.spec) == (None, "fsdp")


def test_mesh_shape_errors():
    assert mesh_lib.resolve_shape((-1, 2, 1), 8) == (4, 2, 1)
    with pytest.raises(UserInputError, match="does not divide"):
        mesh_lib.resolve_shape((-1, 3, 1), 8)
    with pytest.raises(UserInputError, match="at most one"):
        mesh_lib.resolve_shape((-1, -1, 1), 8)


def test_config_rejects_unknown_keys_and_flavours():
    with pytest.raises(UserInputError, match="unknown key"):
        C.ModelConfig.from_dict({"d_modle": 3})
    with pytest.raises(UserInputError, match="flavour"):
        C.ModelConfig(flavour="bert")
