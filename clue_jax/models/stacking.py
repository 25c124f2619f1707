"""Layers stacked on a leading "layers" axis and run under `jax.lax.scan`.

A Python loop over N layers traces and compiles N copies of the layer: an
80-layer teacher and a 32-layer student become one huge program. Stacking the
layers' Variables (`nnx.vmap` over split rngs) and scanning over the stack
compiles one layer body whatever the depth. Stacked params carry the logical
axis "layers" first (clue_jax.parallel.rules maps it to no mesh axis).
"""
from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from clue_jax.models.layers import REMAT_POLICIES

LAYERS = "layers"


def stack(make: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
    """`count` modules `make(rngs)` (each its own init keys) as one module whose Variables are [count, ...]."""
    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=count, transform_metadata={nnx.PARTITION_NAME: LAYERS})
    def build(rngs):
        return make(rngs)

    return build(rngs)


def unstack(stacked: nnx.Module) -> list[nnx.Module]:
    """The stacked layers as separate modules (copies of their slices): for inspection and references."""
    graphdef, state = nnx.split(stacked)
    count = jax.tree.leaves(state)[0].shape[0]
    return [nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)) for i in range(count)]


def scan(stacked: nnx.Module, remat: str, body: Callable, carry, xs=None, unroll: int = 1):
    """`jax.lax.scan` of `body(layer, carry, x) -> (carry, y)` over the stacked layers (and `xs`).

    `layer` is one layer's module, merged from its slice of the stacked state
    inside the scan (a pure function of that state, so nothing is written back
    into the outer Variables from the inner trace). Unless remat is "none",
    each scanned step runs under `jax.checkpoint` with the named policy.
    `unroll` steps run per loop iteration (`jax.lax.scan`'s unroll).
    """
    graphdef, state = nnx.split(stacked)

    def step(carry, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), carry, x)

    if remat != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat])
    return jax.lax.scan(step, carry, (state, xs), unroll=unroll)
