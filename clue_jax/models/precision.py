"""`train.precision`: which dtypes a fully fine-tuned model keeps its weights and computes in.

"checkpoint" (the default) trains in the dtypes the model has: those of the
checkpoint it was loaded from (an HF bf16 checkpoint: bf16 weights, bf16 AdamW
moments, bf16 compute) or of its ModelConfig when built from scratch.

"mixed" keeps float32 master weights (and so float32 AdamW moments, which
optax creates in the parameters' dtype) and computes in bfloat16: every flax
layer casts its float32 weights to its compute dtype at call time, and the
gradient flows back through that cast into float32. With bf16 master weights
an update smaller than half a bf16 ulp of the weight (|w| * 2**-9) rounds
away; in float32 it accumulates (tests/test_mixed_precision.py shows both).

The dtype is chosen where a model is built or loaded (`model_config`, used by
`clue_jax.models.factory`), so weights are read straight into float32 and the
saved stage model (and `clue_jax.export`, unless --dtype) stores float32.
LoRA adapters are float32 whatever the precision (`clue_jax.models.lora`).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from clue_jax.choices import PRECISIONS
from clue_jax.errors import UserInputError

MASTER_DTYPE, COMPUTE_DTYPE = "float32", "bfloat16"


def check_name(precision: str, where: str = "train.precision") -> str:
    if precision not in PRECISIONS:
        raise UserInputError(f"{where}={precision!r} is not one of {PRECISIONS}")
    return precision


def model_config(cfg, precision: str):
    """`cfg` with the dtypes `precision` trains in (a ModelConfig or any dataclass with dtype/param_dtype)."""
    if check_name(precision) == "checkpoint":
        return cfg
    return dataclasses.replace(cfg, dtype=COMPUTE_DTYPE, param_dtype=MASTER_DTYPE)


def check_trained(model: nnx.Module, params: nnx.State, precision: str) -> None:
    """Under "mixed" the model must compute in bfloat16 and every trained weight be float32.

    A model built or loaded without the precision would otherwise train in its
    own dtypes without a word; this is the Trainer's guard (a programming error).
    """
    if check_name(precision) != "mixed":
        return
    compute = getattr(getattr(model, "cfg", None), "dtype", COMPUTE_DTYPE)
    if compute != COMPUTE_DTYPE:
        raise ValueError(f"train.precision='mixed' but the model computes in {compute}: build or load it "
                         "through clue_jax.models.factory with the precision")
    for path, leaf in nnx.to_flat_state(params):
        value = leaf.get_value() if hasattr(leaf, "get_value") else leaf
        if jnp.issubdtype(value.dtype, jnp.floating) and value.dtype != jnp.float32:
            raise ValueError(f"train.precision='mixed' but parameter {'/'.join(map(str, path))} is {value.dtype}: "
                             "build or load the model through clue_jax.models.factory with the precision")


def regraph(model: nnx.Module, cfg) -> nnx.Module:
    """`model`'s weights under the graph of `type(model)(cfg)`, built abstractly.

    Flax layers hold their compute and parameter dtypes in the graph, not in
    the weights: casting the weights alone would still compute in the old dtype.
    """
    graphdef = nnx.split(nnx.eval_shape(lambda: type(model)(cfg, rngs=nnx.Rngs(0))))[0]
    return nnx.merge(graphdef, nnx.state(model))
