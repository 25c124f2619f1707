"""Logical axis names -> mesh axes, the MaxText way.

Models name their parameter axes (vocab, embed, heads, kv_heads, mlp, pos);
`RULES` maps each to a mesh axis. A dimension that the mesh axis does not
divide is replicated instead, so tiny test models and odd vocabularies work
on any mesh.
"""
from __future__ import annotations

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
}

BATCH_AXES = ("data", "fsdp")  # the batch is split over both data-parallel axes


def _spec_for(shape, names, mesh: Mesh, rules) -> P:
    axes = []
    for size, name in zip(shape, names):
        axis = rules.get(name) if name is not None else None
        if axis is not None and (mesh.shape[axis] == 1 or size % mesh.shape[axis]):
            axis = None
        axes.append(axis)
    return P(*axes)


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
