"""Logical axis names -> mesh axes, the MaxText way.

Models name their parameter axes (vocab, embed, heads, kv_heads, mlp, pos)
and their activations' axes (activation_batch, activation_length, ...);
`RULES` maps each to a mesh axis (or several). A dimension that the mesh
axes do not divide is replicated instead, so tiny test models and odd
vocabularies work on any mesh.

Activations are pinned with `constrain` inside the program that
`activation_mesh(mesh)` traces. Without the pins XLA is free to keep the
batch whole and gather activations instead of weights (all-reducing
[B, T, mlp] tensors and the full-batch logits on every device); with them
the batch stays split over (data, fsdp) and the weights are all-gathered,
which is what FSDP means. Outside `activation_mesh` (a single device, or a
program built without a mesh) `constrain` returns its input unchanged.
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

RULES: dict[str, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "pos": None,
    "lora": None,
    "layers": None,  # the stacked-layer axis (clue_jax.models.stacking): every device holds its shard of each layer
    # activations: the batch over both data-parallel axes, heads and the MLP hidden layer over tensor;
    # the sequence and the residual stream's features stay whole on each device
    "activation_batch": ("data", "fsdp"),
    "activation_length": None,
    "activation_embed": None,
    "activation_heads": "tensor",
    "activation_kv_heads": "tensor",
    "activation_mlp": "tensor",
    "activation_vocab": "tensor",
}

BATCH_AXES = ("data", "fsdp")  # the batch is split over both data-parallel axes

# The residual stream [B, T, D] and per-token values [B, T].
RESIDUAL = ("activation_batch", "activation_length", "activation_embed")
TOKENS = ("activation_batch", "activation_length")


def _mesh_axes(rule, size: int, mesh: Mesh):
    """The mesh axes (of size > 1) a rule names, or None when they do not divide `size`."""
    axes = tuple(a for a in ((rule,) if isinstance(rule, str) else rule or ()) if mesh.shape[a] > 1)
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes[0] if len(axes) == 1 else axes


def _spec_for(shape, names, mesh: Mesh, rules) -> P:
    return P(*(_mesh_axes(rules.get(name) if name is not None else None, size, mesh)
               for size, name in zip(shape, names)))


def state_shardings(state, mesh: Mesh, rules: dict | None = None):
    """NamedSharding for every leaf of an nnx.State (abstract or concrete).

    Variables with `out_sharding` metadata follow the rules; everything else
    (RoPE tables, counters) is replicated.
    """
    rules = RULES if rules is None else rules

    def one(var):
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
        shape = getattr(value, "shape", ())
        spec = _spec_for(shape, names, mesh, rules) if names else P()
        sharding = NamedSharding(mesh, spec)
        return var.replace(sharding) if isinstance(var, nnx.Variable) else sharding

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch dimension over (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


_ACTIVATION_MESH: contextvars.ContextVar = contextvars.ContextVar("activation_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None):
    """Traces the enclosed code with activations pinned to `mesh` by `constrain` (None: no pins)."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def constrain(x: jax.Array, names: tuple) -> jax.Array:
    """`x` with its sharding pinned by the logical axis `names` (one per dimension, None: unsplit).

    A no-op outside `activation_mesh` or on a one-device mesh, so single-device code is unchanged.
    """
    mesh = _ACTIVATION_MESH.get()
    if mesh is None or mesh.size == 1:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} axis names {names} for an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, _spec_for(x.shape, names, mesh, RULES)))
