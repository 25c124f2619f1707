"""Building blocks shared by the causal LM and the encoder.

Every parameter carries logical axis names (vocab, embed, heads, kv_heads,
mlp, pos) through `nnx.with_partitioning`; `clue_jax.parallel.rules` maps them
to mesh axes, so models never mention a mesh.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from clue_jax.errors import UserInputError

default_kernel_init = nnx.initializers.normal(stddev=0.02)


def linear(in_features: int, out_features: int, names: tuple, *, use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
    """nnx.Linear whose kernel (and bias) carry logical sharding names."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(default_kernel_init, names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
        rngs=rngs,
    )


def embed(num: int, features: int, names: tuple, *, dtype, param_dtype, rngs: nnx.Rngs):
    return nnx.Embed(
        num,
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nnx.with_partitioning(default_kernel_init, names),
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """RMSNorm in float32. `plus_one` is Gemma's (1 + w) parameterisation (w starts at 0)."""

    def __init__(self, features: int, *, eps: float, plus_one: bool, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.zeros_init() if plus_one else nnx.initializers.ones_init()
        self.scale = nnx.Param(nnx.with_partitioning(init, ("embed",))(rngs.params(), (features,), param_dtype))
        self.eps = eps
        self.plus_one = plus_one

    def __call__(self, x):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        if self.plus_one:
            scale = 1.0 + scale
        return (x * scale).astype(dtype)


def layer_norm(features: int, *, eps: float, param_dtype, dtype, rngs: nnx.Rngs):
    return nnx.LayerNorm(
        features,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
        rngs=rngs,
    )


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: tuple = ()) -> jnp.ndarray:
    """RoPE inverse frequencies; `scaling` = (factor, low, high, original_len) is LLaMA-3's."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if not scaling:
        return inv
    factor, low, high, original = scaling
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > original / low, inv / factor, inv)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the HF convention) on [B, T, N, H] at integer positions [B, T]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids that start at 0 on the first real token, so left padding works."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def softcap(x: jax.Array, cap: float) -> jax.Array:
    return jnp.tanh(x / cap) * cap if cap else x


# Rematerialisation: what a block keeps for the backward pass. "full" keeps only
# its inputs; "dots" also keeps the outputs of matmuls without batch dimensions
# (the projections), so only attention and elementwise work is recomputed.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy_name(value, where: str) -> str:
    """Normalises a remat setting (a name, or a legacy bool) or raises one line naming `where`."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in REMAT_POLICIES:
        raise UserInputError(f"{where}={value!r} is not one of {sorted(REMAT_POLICIES)}")
    return value


def set_remat(model: nnx.Module, remat) -> nnx.Module:
    """Sets the remat policy of every layer stack in `model` (the causal LM, encoder bodies)."""
    policy = remat_policy_name(remat, "train.remat")
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and hasattr(node, "remat"):
            node.remat = policy
    return model
