"""clue_jax.extraction"""
