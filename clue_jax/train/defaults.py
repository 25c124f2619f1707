"""Default `train` settings; configs override only what they change."""
from __future__ import annotations

import ml_collections


def train_config(**overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(
        dict(
            steps=100,
            batch_size=8,  # global batch, split over the data and fsdp mesh axes
            micro_batches=1,  # gradient accumulation: batch_size is split into this many
            seq_len=128,
            lr=1e-3,
            warmup_steps=10,
            schedule="cosine",  # cosine | linear | constant
            weight_decay=0.01,
            clip_norm=1.0,
            b1=0.9,
            b2=0.98,
            seed=0,
            log_every=10,
            eval_every=1000000,
            checkpoint_every=1000,
            keep_checkpoints=2,
            remat="none",  # none | full | dots: recompute block activations in the backward pass
            # checkpoint: weights, AdamW moments and compute in the model's dtype (a bf16 checkpoint trains in
            # bf16); mixed: float32 master weights and moments, bfloat16 compute (clue_jax.models.precision)
            precision="checkpoint",
        )
    )
    cfg.update(overrides)
    return cfg
