"""One config for every model flavour, so the loader, trainer and scorer share it.

A decoder flavour ("gpt2", "llama", "gemma2") picks the block's norms,
positions, MLP and attention details; the numbers come from the fields.
`from_dict` rejects unknown keys by name so a typo in a config file fails early.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from clue_jax import dataclass_config
from clue_jax.choices import FLAVOURS
from clue_jax.errors import UserInputError
from clue_jax.models.layers import remat_policy_name



@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a causal LM. Defaults give a tiny GPT-2-style model."""

    flavour: str = "gpt2"
    vocab_size: int = 512
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 0  # 0 means equal to num_heads (no grouped-query attention)
    head_dim: int = 0  # 0 means d_model // num_heads
    mlp_dim: int = 256
    max_len: int = 256  # learned positions (GPT-2) and the longest sequence accepted
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    use_bias: bool = False  # GPT-2 uses biases everywhere
    rope_theta: float = 10000.0
    # LLaMA-3 rope scaling: factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings. Empty tuple: none.
    rope_scaling: tuple = ()
    sliding_window: int = 0  # Gemma-2: even layers (0, 2, ...) attend this far back; 0 = off
    attn_logit_softcap: float = 0.0  # Gemma-2: tanh soft cap of attention logits; 0 = off
    final_logit_softcap: float = 0.0  # Gemma-2: tanh soft cap of output logits; 0 = off
    query_pre_attn_scalar: float = 0.0  # Gemma-2: queries scaled by this**-0.5; 0 = head_dim
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # Recompute block activations in the backward pass: "none", "full" or "dots"
    # (see layers.REMAT_POLICIES; a bool means "full"/"none"). The Trainer sets
    # it from train.remat for every model it trains.
    remat: str = "none"
    # Scanned layer steps unrolled per loop iteration: 1 compiles one layer whatever the depth (pods, deep
    # models); >= the number of steps (num_layers; num_layers / 2 for Gemma-2's window pairs) unrolls the loop (a 4-layer quickstart model trains about 1.3x faster on a CPU,
    # benchmarks/compile_depth.py shows what it costs in compile time).
    scan_unroll: int = 1

    def __post_init__(self):
        object.__setattr__(self, "remat", remat_policy_name(self.remat, "model.remat"))
        if not isinstance(self.scan_unroll, int) or isinstance(self.scan_unroll, bool) or self.scan_unroll < 1:
            raise UserInputError(f"model.scan_unroll={self.scan_unroll!r} must be an integer >= 1")
        if self.flavour not in FLAVOURS:
            raise UserInputError(f"model.flavour={self.flavour!r} is not one of {FLAVOURS}")
        if self.d_model % self.num_heads and not self.head_dim:
            raise UserInputError(
                f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}; set model.head_dim"
            )
        if self.num_heads % self.kv_heads:
            raise UserInputError(
                f"model.num_heads={self.num_heads} is not a multiple of model.num_kv_heads={self.kv_heads}"
            )

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weights_dtype(self):
        return jnp.dtype(self.param_dtype)

    def is_sliding_layer(self, layer: int) -> bool:
        """Gemma-2 alternates: layer 0 sliding, layer 1 global, ... (as HF's layer_types)."""
        return bool(self.sliding_window) and layer % 2 == 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = list(self.rope_scaling)
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "model") -> "ModelConfig":
        values = dict(values)
        if "rope_scaling" in values:
            values["rope_scaling"] = tuple(values["rope_scaling"] or ())
        return dataclass_config.from_dict(cls, values, where)


def gpt2(**overrides) -> ModelConfig:
    """GPT-2: learned positions, LayerNorm, GELU, biases, tied embeddings."""
    return ModelConfig(flavour="gpt2", use_bias=True, tie_embeddings=True, **overrides)


def llama(**overrides) -> ModelConfig:
    """LLaMA-3: RMSNorm, RoPE (theta 500000), SwiGLU, grouped-query attention."""
    base = dict(flavour="llama", use_bias=False, tie_embeddings=False, rope_theta=500000.0, norm_eps=1e-5)
    base.update(overrides)
    return ModelConfig(**base)


def gemma2(**overrides) -> ModelConfig:
    """Gemma-2: scaled embeddings, pre+post norms, soft-capping, alternating sliding windows."""
    base = dict(
        flavour="gemma2",
        use_bias=False,
        tie_embeddings=True,
        norm_eps=1e-6,
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
        sliding_window=4096,
    )
    base.update(overrides)
    return ModelConfig(**base)
