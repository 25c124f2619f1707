"""clue_jax.clues"""
