"""clue_jax.models: Flax NNX causal LMs and encoders.

Variables are created unsharded and placed later by clue_jax.parallel.rules
from their logical axis names (flax's eager sharding would need a mesh at
construction time, which the model code should not know about).
"""
import flax

flax.config.update("flax_always_shard_variable", False)
