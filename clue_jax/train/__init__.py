"""clue_jax.train"""
