"""Decoder-only causal LM in Flax NNX: GPT-2, LLaMA-3 and Gemma-2 from one config.

`model(input_ids, attention_mask)` gives float32 logits [B, T, V] (fast
attention). `model.received_attention_sums(...)` runs the same weights through
the blocked scoring attention and returns, summed over layers, heads and real
queries, the attention each token receives (clue dropout's raw material).

The layers are stacked and scanned (clue_jax.models.stacking), so compile
time does not grow with depth. The scanned unit must be the same program every
step, and Gemma-2's alternating windows are static (the fused kernels need
them at trace time), so with a window the unit is a `LayerPair` (a sliding
and a global Block; layer 2u is pair u's sliding one, 2u+1 its global one)
and `model.blocks` holds num_layers / 2 of them; otherwise it holds
num_layers Blocks.

Activations are pinned (clue_jax.parallel.rules.constrain) at the embedding,
the attention heads and output, the MLP hidden layer, every block's output
and the logits: batch over (data, fsdp), heads and MLP hidden over tensor.
Under a mesh that keeps each device's share of the batch on that device and
makes XLA gather weights rather than activations; without one they do nothing.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clue_jax.errors import UserInputError
from clue_jax.models import attention as attn
from clue_jax.models import layers, stacking
from clue_jax.models.config import ModelConfig
from clue_jax.parallel.rules import RESIDUAL, constrain

_HEADS = ("activation_batch", "activation_length", "activation_heads", None)
_KV_HEADS = ("activation_batch", "activation_length", "activation_kv_heads", None)
_MLP = ("activation_batch", "activation_length", "activation_mlp")
_LOGITS = ("activation_batch", "activation_length", "activation_vocab")


def _norm(cfg: ModelConfig, rngs: nnx.Rngs):
    if cfg.flavour == "gpt2":
        return layers.layer_norm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.weights_dtype, dtype=cfg.compute_dtype, rngs=rngs)
    return layers.RMSNorm(
        cfg.d_model, eps=cfg.norm_eps, plus_one=cfg.flavour == "gemma2", param_dtype=cfg.weights_dtype, rngs=rngs
    )


class SelfAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        self.cfg = cfg
        self.sliding_window = cfg.sliding_window if cfg.is_sliding_layer(layer) else 0
        h, n, k = cfg.head_size, cfg.num_heads, cfg.kv_heads
        kw = dict(use_bias=cfg.use_bias, dtype=cfg.compute_dtype, param_dtype=cfg.weights_dtype, rngs=rngs)
        self.q_proj = layers.linear(cfg.d_model, n * h, ("embed", "heads"), **kw)
        self.k_proj = layers.linear(cfg.d_model, k * h, ("embed", "kv_heads"), **kw)
        self.v_proj = layers.linear(cfg.d_model, k * h, ("embed", "kv_heads"), **kw)
        self.o_proj = layers.linear(n * h, cfg.d_model, ("heads", "embed"), **kw)
        if cfg.flavour == "gemma2" and cfg.query_pre_attn_scalar:
            self.scale = cfg.query_pre_attn_scalar**-0.5
        else:
            self.scale = h**-0.5
        self.inv_freq = None if cfg.flavour == "gpt2" else nnx.Variable(
            layers.rope_inverse_frequencies(h, cfg.rope_theta, cfg.rope_scaling)
        )

    def project(self, x, positions):
        """Queries, keys and values of `x` [B, T, D], rotated; shared with the KV-cached decoder."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = constrain(self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_size), _HEADS)
        k = constrain(self.k_proj(x).reshape(b, t, cfg.kv_heads, cfg.head_size), _KV_HEADS)
        v = constrain(self.v_proj(x).reshape(b, t, cfg.kv_heads, cfg.head_size), _KV_HEADS)
        if self.inv_freq is not None:
            q = layers.apply_rope(q, positions, self.inv_freq[...])
            k = layers.apply_rope(k, positions, self.inv_freq[...])
        return q, k, v

    def __call__(self, x, positions, key_mask, request: attn.ScoreRequest | None):
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = self.project(x, positions)
        stats = None
        if request is None:
            out = attn.causal_attention(q, k, v, key_mask, scale=self.scale, softcap=cfg.attn_logit_softcap,
                                        sliding_window=self.sliding_window)
        else:
            out, colsum, row = attn.attend_and_score(
                q, k, v, key_mask, scale=self.scale, softcap=cfg.attn_logit_softcap,
                sliding_window=self.sliding_window, request=request,
            )
            stats = (colsum, row)
        out = constrain(out, _HEADS).reshape(b, t, -1)
        return constrain(self.o_proj(out), RESIDUAL), stats


class MLP(nnx.Module):
    """GPT-2: GELU(tanh) MLP. LLaMA: SwiGLU. Gemma-2: GeGLU(tanh)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        kw = dict(use_bias=cfg.use_bias, dtype=cfg.compute_dtype, param_dtype=cfg.weights_dtype, rngs=rngs)
        self.gated = cfg.flavour != "gpt2"
        self.activation = jax.nn.silu if cfg.flavour == "llama" else (lambda x: jax.nn.gelu(x, approximate=True))
        if self.gated:
            self.gate_proj = layers.linear(cfg.d_model, cfg.mlp_dim, ("embed", "mlp"), **kw)
        self.up_proj = layers.linear(cfg.d_model, cfg.mlp_dim, ("embed", "mlp"), **kw)
        self.down_proj = layers.linear(cfg.mlp_dim, cfg.d_model, ("mlp", "embed"), **kw)

    def __call__(self, x):
        if self.gated:
            hidden = self.activation(constrain(self.gate_proj(x), _MLP)) * constrain(self.up_proj(x), _MLP)
        else:
            hidden = self.activation(constrain(self.up_proj(x), _MLP))
        return constrain(self.down_proj(constrain(hidden, _MLP)), RESIDUAL)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        self.post_norms = cfg.flavour == "gemma2"
        self.input_norm = _norm(cfg, rngs)
        self.attn = SelfAttention(cfg, layer, rngs)
        self.mlp_norm = _norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)
        if self.post_norms:
            self.post_attn_norm = _norm(cfg, rngs)
            self.post_mlp_norm = _norm(cfg, rngs)

    def __call__(self, x, positions, key_mask, request=None):
        return self.residual(x, lambda y: self.attn(y, positions, key_mask, request))

    def residual(self, x, attend):
        """The block around an attention `attend(normed x) -> (h, extra)`; the KV-cached decoder passes its own."""
        h, extra = attend(self.input_norm(x))
        if self.post_norms:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.post_norms:
            h = self.post_mlp_norm(h)
        return constrain(x + h, RESIDUAL), extra

    def sublayers(self) -> tuple:
        """The layers of one scanned step, in order."""
        return (self,)


class LayerPair(nnx.Module):
    """Gemma-2's period of two layers: a sliding-window Block, then a global one."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.sliding = Block(cfg, 0, rngs)
        self.full = Block(cfg, 1, rngs)

    def sublayers(self) -> tuple:
        return (self.sliding, self.full)


PAIR_NAMES = ("sliding", "full")  # LayerPair's attributes, by layer parity


def period(cfg: ModelConfig) -> int:
    """Layers per scanned step: 2 with Gemma-2's alternating windows, else 1."""
    return 2 if cfg.sliding_window else 1


def _layer_unit(cfg: ModelConfig):
    if not cfg.sliding_window:
        return lambda rngs: Block(cfg, 0, rngs)
    if cfg.num_layers % 2:
        raise UserInputError(f"model.num_layers={cfg.num_layers} must be even with model.sliding_window="
                             f"{cfg.sliding_window} (layers are scanned in sliding/global pairs)")
    return lambda rngs: LayerPair(cfg, rngs)


class CausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weights_dtype, rngs=rngs)
        self.embed_tokens = layers.embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), **kw)
        if cfg.flavour == "gpt2":
            self.embed_positions = layers.embed(cfg.max_len, cfg.d_model, ("pos", "embed"), **kw)
        self.blocks = stacking.stack(_layer_unit(cfg), cfg.num_layers // period(cfg), rngs)
        self.final_norm = _norm(cfg, rngs)
        self.remat = cfg.remat  # layers.set_remat changes it for training
        if not cfg.tie_embeddings:
            self.lm_head = layers.linear(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), use_bias=False, **kw)

    def _embed(self, input_ids, positions):
        if self.cfg.flavour == "gpt2" and input_ids.shape[-1] > self.cfg.max_len:  # learned positions end there
            raise UserInputError(f"sequence length {input_ids.shape[-1]} exceeds the GPT-2 model's "
                                 f"max_len={self.cfg.max_len} positions")
        x = self.embed_tokens(input_ids)
        if self.cfg.flavour == "gpt2":
            x = x + self.embed_positions(positions)
        if self.cfg.flavour == "gemma2":
            x = x * jnp.asarray(self.cfg.d_model**0.5, dtype=x.dtype)
        return constrain(x, RESIDUAL)

    def _inputs(self, input_ids, attention_mask, positions):
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if positions is None:
            positions = layers.positions_from_mask(attention_mask)
        return attention_mask, positions

    def hidden_states(self, input_ids, attention_mask=None, positions=None):
        attention_mask, positions = self._inputs(input_ids, attention_mask, positions)
        x = self._embed(input_ids, positions)

        def step(unit, x, _):
            for block in unit.sublayers():
                x, _ = block(x, positions, attention_mask)
            return x, None

        x, _ = stacking.scan(self.blocks, self.remat, step, x, unroll=self.cfg.scan_unroll)
        return self.final_norm(x)

    def __call__(self, input_ids, attention_mask=None, positions=None):
        return self.logits(self.hidden_states(input_ids, attention_mask, positions))

    def logits(self, hidden):
        """Float32 logits [..., V] of final hidden states [..., D] (the loss calls it a chunk of [B, T] at a time)."""
        if self.cfg.tie_embeddings:
            logits = self.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        logits = layers.softcap(logits.astype(jnp.float32), self.cfg.final_logit_softcap)
        return constrain(logits, _LOGITS) if logits.ndim == 3 else logits

    def received_attention_sums(self, input_ids, attention_mask=None, *, query_block: int = 128, query_index=None):
        """Attention received per token, summed over layers, heads and real queries.

        Returns dict(colsum [B, T], row [B, T] or None) in float32; `row` sums the
        attention rows of `query_index` [B] over layers and heads. The LM head is
        skipped: scoring needs no logits.
        """
        attention_mask, positions = self._inputs(input_ids, attention_mask, None)
        request = attn.ScoreRequest(query_block=query_block, query_index=query_index)
        x = self._embed(input_ids, positions)
        zeros = jnp.zeros(input_ids.shape, jnp.float32)

        def step(unit, carry, _):
            x, colsum, row = carry
            for block in unit.sublayers():
                x, (c, r) = block(x, positions, attention_mask, request)
                colsum = colsum + c
                if r is not None:
                    row = row + r
            return (x, colsum, row), None

        (_, colsum, row), _ = stacking.scan(self.blocks, "none", step, (x, zeros, zeros),
                                            unroll=self.cfg.scan_unroll)
        return {"colsum": colsum, "row": row if query_index is not None else None}
