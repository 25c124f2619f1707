"""LoRA adapters on a CausalLM's projections, built on Flax NNX's own `nnx.LoRA`.

The paper trains students with LoRA rank 16 on all projection weights. Each
targeted `nnx.Linear` is wrapped by `LoRALinear` (an `nnx.LoRA` with the
Linear as its `base_module`), whose A [in, r] and B [r, out] are
`nnx.LoRAParam`s: the trainer differentiates only those (`trainable_filter`),
so the base weights stay frozen without copying them. B starts at zero, so the
adapted model starts equal to the base model. `merge_lora` folds
W + (alpha / r) * A @ B back into the kernels and restores plain Linears, so
`clue_jax.models.hf.save` exports an ordinary checkpoint. A LoRA student's
stage saves only its adapters (`save_adapters`); reading the stage's model
(`load_merged`, through clue_jax.models.factory.load_params) merges them into
the base model it names.

Adapter params carry the logical names (<kernel's input axis>, "lora") and
("lora", <kernel's output axis>), which clue_jax.parallel.rules maps like the
kernel they adapt ("lora" itself is replicated). A Linear of stacked layers
(kernel [L, in, out], clue_jax.models.stacking) gets stacked adapters
[L, in, r] and [L, r, out], each layer initialised with its own key, under the
kernel's leading axis names; the scan hands every layer its own slices.
"""
from __future__ import annotations

import json
from typing import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from clue_jax import workdir_fs as paths  # the one path layer (local or gs://, s3://, az://)
from clue_jax.errors import UserInputError
from clue_jax.models import store

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nnx.LoRA):
    """`nnx.LoRA` around an existing nnx.Linear with the usual alpha / rank scale.

    y = base(x) + (alpha / rank) * x @ A @ B. nnx.LoRA itself has no scale; the
    scale matters because it sets the adapters' effective learning rate.
    """

    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, rngs: nnx.Rngs, param_dtype=jnp.float32):
        lead = tuple(base.kernel.shape[:-2])  # the stacked-layer axes, if any
        names = base.kernel.get_metadata().get("out_sharding") or (None,) * (len(lead) + 2)
        super().__init__(
            base.in_features,
            rank,
            base.out_features,
            base_module=base,
            dtype=base.dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            a_initializer=_stacked(nnx.initializers.he_uniform(), lead),
            b_initializer=_stacked(nnx.initializers.zeros_init(), lead),
            a_metadata={"out_sharding": (*names[:-1], "lora")},
            b_metadata={"out_sharding": (*names[:-2], "lora", names[-1])},
        )
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base_module(x)
        x, a, b = self.promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
        return y + ((x @ a @ b) * self.scale).astype(y.dtype)

    def merged_kernel(self) -> jax.Array:
        """W + scale * A @ B in float32 (full-precision matmul), cast back to W's dtype."""
        w = self.base_module.kernel[...]
        delta = jnp.matmul(
            self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        return (w.astype(jnp.float32) + self.scale * delta).astype(w.dtype)


def _stacked(init, lead: tuple):
    """`init` applied per layer (its own key each) over the leading stacked axes `lead`."""
    if not lead:
        return init

    def stacked(key, shape, dtype):
        keys = jax.random.split(key, lead)
        fn = lambda k: init(k, shape, dtype)
        for _ in lead:
            fn = jax.vmap(fn)
        return fn(keys)

    return stacked


def trainable_filter(lora_enabled: bool):
    """What the optimizer differentiates: only the adapters with LoRA, else every Param."""
    return nnx.LoRAParam if lora_enabled else nnx.Param


def has_lora(model: nnx.Module) -> bool:
    return any(isinstance(m, LoRALinear) for _, m in nnx.iter_modules(model))


def _parent(model: nnx.Module, path: tuple):
    node = model
    for key in path[:-1]:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
    parent, key = _parent(model, path), path[-1]
    if isinstance(key, int):
        parent[key] = new
    else:
        setattr(parent, key, new)


def apply_lora(
    model: nnx.Module,
    rank: int,
    alpha: float,
    targets: Iterable[str] = PROJECTIONS,
    rngs: nnx.Rngs | None = None,
    *,
    param_dtype=jnp.float32,
) -> nnx.Module:
    """Wraps every nnx.Linear whose attribute name is in `targets` (in place; returns the model).

    Targets absent from a flavour (gate_proj in GPT-2) are skipped; a name not
    in PROJECTIONS, or no match at all, is a UserInputError. Adapters are kept
    in float32 by default (they are small, and the optimizer updates them).
    """
    targets = tuple(targets)
    unknown = sorted(set(targets) - set(PROJECTIONS))
    if unknown:
        raise UserInputError(f"lora.targets: unknown projection(s) {unknown}; valid: {list(PROJECTIONS)}")
    if rank < 1:
        raise UserInputError(f"lora.rank={rank} must be >= 1")
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters (merge_lora first)")
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    found = [
        (path, m) for path, m in nnx.iter_modules(model)
        if path and isinstance(m, nnx.Linear) and path[-1] in targets
    ]
    if not found:
        raise UserInputError(f"lora.targets={list(targets)}: no such nnx.Linear in the model")
    for path, linear in found:
        _replace(model, path, LoRALinear(linear, rank=rank, alpha=alpha, rngs=rngs, param_dtype=param_dtype))
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its base kernel and restores the plain nnx.Linear (in place; returns the model)."""
    found = [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)]
    for path, wrapper in found:
        base = wrapper.base_module
        base.kernel.set_value(wrapper.merged_kernel())
        _replace(model, path, base)
    return model


# ----------------------------------------------------------------------------- adapters on disk

ADAPTERS_FILE = "lora_adapters.json"  # beside model_config.json in a model directory of adapters only


def save_adapters(model: nnx.Module, cfg, directory: str, *, base_dir: str, rank: int, alpha: float,
                  targets: Iterable[str]) -> None:
    """Saves only the adapters of a LoRA model (the model store), the base model's directory and the LoRA settings.

    A LoRA student's stage then stores r x (in + out) numbers per projection
    instead of a merged copy of the whole model; `load_merged` (which
    clue_jax.models.factory.load_params calls for such a directory) rebuilds the
    merged model, so every reader and clue_jax.export sees an ordinary model.
    """
    if not has_lora(model):
        raise ValueError("save_adapters: the model has no LoRA adapters")
    meta = {"base_model_dir": paths.absolute(base_dir), "rank": int(rank), "alpha": float(alpha),
            "targets": list(targets)}
    store.save(model, directory, {"model_config.json": cfg.to_dict(), ADAPTERS_FILE: meta}, what=nnx.LoRAParam)


def load_merged(directory: str, mesh, precision: str = "checkpoint"):
    """(merged model, config) from a directory of `save_adapters`: its base model with the adapters folded in."""
    from clue_jax.models import factory  # factory reads such directories through here

    directory = paths.absolute(directory)
    meta_path = paths.join(directory, ADAPTERS_FILE)
    meta = json.loads(paths.read_text(meta_path))
    model, cfg = factory.load_params(meta["base_model_dir"], mesh, expected=factory.read_config(directory),
                                     precision=precision)
    apply_lora(model, meta["rank"], meta["alpha"], tuple(meta["targets"]), rngs=nnx.Rngs(0))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())  # small: whole on every device
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          nnx.state(model, nnx.LoRAParam))
    adapters = store.restore(directory, target)  # checksummed like every saved model
    nnx.update(model, adapters)
    return merge_lora(model), cfg
