"""clue_jax.eval"""
