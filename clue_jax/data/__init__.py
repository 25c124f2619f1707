"""clue_jax.data"""
