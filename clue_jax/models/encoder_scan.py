"""The encoder's layers as ONE stacked module run under `jax.lax.scan`.

An unrolled Python loop over layers puts every layer's ops into the compiled
program, so compile time grows with depth; a scan compiles one layer. The
stack is built with `nnx.vmap` over split rngs: every parameter gets a leading
[num_layers] axis whose logical name is "layers" (`LAYER_AXIS`), which the
sharding rules map to no mesh axis (`clue_jax.train.sharding` replicates names
it has no rule for). Parameter paths are therefore `.../layers/query/kernel`
with shape [L, ...]; the per-layer layout (`.../layers/0/query/kernel`, before
the scan) is refused on restore with one line by
`clue_jax.train.checkpoint.refuse_per_layer_layout`.
"""
from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from clue_jax.models import layers

LAYER_AXIS = "layers"


def stack(make: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """`make(rngs)` num_layers times, as one module whose parameters are stacked on a leading axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS})
    def build(rngs):
        return make(rngs)

    return build(rngs)


def num_stacked(stacked: nnx.Module) -> int:
    """The number of layers in a stack (the leading axis of its parameters)."""
    return jax.tree.leaves(nnx.state(stacked, nnx.Param))[0].shape[0]


def scan(stacked: nnx.Module, remat: str, x: jax.Array, *args, dropout_key: jax.Array | None = None):
    """x -> layer_{L-1}(... layer_0(x, *args, key_0) ...), one compiled step per layer.

    Layer l gets the l-th of `jax.random.split(dropout_key, L)` (None when no
    key: deterministic), the keys the unrolled loop used, so a given key
    gives the same result as before. Each step is rematerialised with the
    named policy (`layers.REMAT_POLICIES`), as `layers.call_block` does for
    one block: the step is a pure function of the layer's state slice, so
    nothing is written into Variables from inside the scan or checkpoint.
    """
    graphdef, state = nnx.split(stacked)
    n = num_stacked(stacked)
    keys = None if dropout_key is None else jax.random.split(dropout_key, n)

    def step(x, inputs):
        layer_state, key = inputs
        return nnx.merge(graphdef, layer_state)(x, *args, key), None

    if remat != "none":
        step = jax.checkpoint(step, policy=layers.REMAT_POLICIES[remat])
    x, _ = jax.lax.scan(step, x, (state, keys))
    return x
