"""Analytic matmul FLOPs of a causal LM step, for the scale plan.

Why not XLA's `cost_analysis()`: the layers run under `lax.scan`, and XLA
counts a while loop's body once, so its total no longer grows with depth.
This is PaLM's count of the matmuls (every key of the causal mask counted,
as a dense kernel computes it; norms, softmax, the loss and AdamW left out):
per token, a forward pass costs 2 N + 4 L (heads x head_dim) T, N being the
weights of the projections, the MLP and (for training) the LM head. A
trained weight's backward costs two more of its forward (input and weight
gradients), a frozen weight's one (input gradient only: LoRA, whose rank-r
adapters are left out); attention's backward costs two; remat "full"
recomputes the layers' forward once (the LM head is outside the checkpoint;
"dots" saves the matmul outputs).
tests/test_model_flops.py checks the count against XLA's on a one-layer model.
"""
from __future__ import annotations


def matmul_weights(cfg, lm_head: bool) -> int:
    """Weights every token multiplies: per layer q, k, v, o and the MLP, plus the LM head if asked."""
    d, attn, kv = cfg.d_model, cfg.num_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    mlp = (2 if cfg.flavour == "gpt2" else 3) * d * cfg.mlp_dim
    per_layer = 2 * d * attn + 2 * d * kv + mlp
    return cfg.num_layers * per_layer + (d * cfg.vocab_size if lm_head else 0)


def forward_flops(cfg, batch: int, seq: int, lm_head: bool = True) -> tuple[float, float]:
    """(weight matmuls, attention matmuls) FLOPs of one forward pass over batch x seq tokens."""
    tokens = batch * seq
    weights = 2.0 * matmul_weights(cfg, lm_head) * tokens
    attention = 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_size * seq * tokens
    return weights, attention


def train_step_flops(cfg, batch: int, seq: int, *, frozen_base: bool, remat: str) -> float:
    """Forward + backward (+ the remat recompute of the scanned layers, not of the LM head) of one step."""
    weights, attention = forward_flops(cfg, batch, seq)
    head = 2.0 * cfg.d_model * cfg.vocab_size * batch * seq
    recompute = 1.0 if remat == "full" else 0.0
    backward = 1.0 if frozen_base else 2.0
    return ((1.0 + backward + recompute) * (weights - head) + (1.0 + backward) * head
            + (3.0 + recompute) * attention)


def scoring_flops(cfg, batch: int, seq: int) -> float:
    """One teacher's received-attention pass: a forward without the LM head."""
    return sum(forward_flops(cfg, batch, seq, lm_head=False))
