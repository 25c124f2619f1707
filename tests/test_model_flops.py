"""benchmarks/model_flops.py against XLA's own count on a one-layer model (a scan of one step is counted whole)."""
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from benchmarks import model_flops
from clue_jax.models.causal_lm import CausalLM
from clue_jax.models.config import llama

CFG = llama(vocab_size=1024, d_model=256, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=512, max_len=128)
BATCH, SEQ = 2, 128


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


@pytest.fixture(scope="module")
def split_model():
    graphdef, params = nnx.split(CausalLM(CFG, rngs=nnx.Rngs(0)))
    return graphdef, params, jnp.ones((BATCH, SEQ), jnp.int32)


def test_forward_count_matches_xla(split_model):
    graphdef, params, ids = split_model
    xla = _xla_flops(lambda p, x: nnx.merge(graphdef, p)(x), params, ids)
    assert xla == pytest.approx(sum(model_flops.forward_flops(CFG, BATCH, SEQ)), rel=0.1)


def test_train_step_count_matches_xla(split_model):
    graphdef, params, ids = split_model

    def loss(p, x):
        logits = nnx.merge(graphdef, p)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], x[:, 1:]).mean()

    xla = _xla_flops(jax.grad(loss), params, ids)
    expected = model_flops.train_step_flops(CFG, BATCH, SEQ, frozen_base=False, remat="none")
    assert xla == pytest.approx(expected, rel=0.15)
    # a frozen base skips the weight gradients: two thirds of the weight matmuls' step
    frozen = model_flops.train_step_flops(CFG, BATCH, SEQ, frozen_base=True, remat="none")
    weights, attention = model_flops.forward_flops(CFG, BATCH, SEQ)
    assert expected - frozen == pytest.approx(weights)
