"""clue_jax.mcl"""
