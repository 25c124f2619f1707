"""clue_jax: teach language models facts from small, knowledge-dense text.

Three methods in one JAX/Flax NNX trainer: clue dropout (contrast of a large
and a small teacher's received attention), frequency-shock remedies for
knowledge extraction, and MCL course learning for ELECTRA-style encoders.
"""

__version__ = "0.1.0"
