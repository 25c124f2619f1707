"""One store for every model the project keeps: built on the mesh, saved, restored sharded, checksummed.

The causal LMs (clue_jax.models.factory) and the MCL generator/discriminator
pair use it alike, and the trainer's checkpoints (clue_jax.train.checkpoint)
use its checksums and layout checks. A saved model directory holds

    params/          the nnx.Param arrays (orbax, one shard per process)
    checksums.json   a checksum per array, computed on the devices at save
    <configs>.json   the model's own config files, written last

so a directory whose config files exist was saved completely. Every read
recomputes the checksums on the restored arrays (before any dtype cast) and
refuses a directory whose arrays differ, whose checksums are missing or that
orbax cannot read, with a `DamagedModel` error naming it: flipped bits never
reach training silently. Orbax's own write errors (a full disk, a denied
permission) become an OSError naming the path (clue_jax.models.orbax_errors),
which the CLI prints as one line.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from clue_jax import workdir_fs
from clue_jax.errors import UserInputError
from clue_jax.models.orbax_errors import write_errors

CHECKSUMS = "checksums.json"

# Layer containers whose layers are stacked now (clue_jax.models.stacking); a
# saved path with a layer index right after one is the old per-layer layout.
PER_LAYER_CONTAINERS = ("blocks", "layers")  # the causal LM's and the encoder's layer stacks
_PER_LAYER = re.compile(r"\['(%s)'\]\['?(\d+)'?\]" % "|".join(PER_LAYER_CONTAINERS))

Placement = Callable[[Any], Any]  # abstract state -> a matching tree of shardings


class DamagedModel(UserInputError):
    """A saved model whose arrays cannot be read or differ from their checksums; `directory` names it."""

    def __init__(self, directory: str, why: str):
        super().__init__(f"saved model {directory} is damaged: {why}")
        self.directory = directory


# ------------------------------------------------------------------ create / save / restore
_INITS: dict = {}


def create(build: Callable[[jax.Array], nnx.Module], seed: int, place: Placement, cache_key=None) -> nnx.Module:
    """`build(seed)` initialised under jit straight onto the shardings `place` gives, never whole on one device.

    The seed is traced, so with a `cache_key` (hashable: the configs and the mesh) every seed reuses one compile.
    """
    init = _INITS.get(cache_key) if cache_key is not None else None
    if init is None:
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(jnp.uint32(0))))
        init = graphdef, jax.jit(lambda s: nnx.split(build(s))[1], out_shardings=place(abstract))
        if cache_key is not None:
            _INITS[cache_key] = init
    graphdef, fn = init
    return nnx.merge(graphdef, fn(jnp.asarray(seed, jnp.uint32)))


def save(module: nnx.Module, directory: str, configs: dict[str, dict], what=nnx.Param) -> None:
    """The module's variables of kind `what` (nnx.Param; a LoRA stage: nnx.LoRAParam only), their checksums,
    then `configs` ({file name: JSON object}); a URL works too."""
    directory = workdir_fs.absolute(directory)
    params = nnx.state(module, what)
    item = workdir_fs.join(directory, "params")
    with write_errors(item), ocp.StandardCheckpointer() as ckpt:
        ckpt.save(item, params, force=True)
    sums = checksums(nnx.to_pure_dict(params))
    if jax.process_index() == 0:
        workdir_fs.write_text(workdir_fs.join(directory, CHECKSUMS), json.dumps(sums, indent=0, sort_keys=True))
        for name, value in configs.items():
            workdir_fs.write_text(workdir_fs.join(directory, name), json.dumps(value, indent=1))


def restore(directory: str, target: nnx.State, saved_dtypes: nnx.State | None = None) -> nnx.State:
    """The params saved in `directory`, placed as `target` (ShapeDtypeStructs with shardings) says.

    `saved_dtypes` (same tree, the dtypes as saved) when `target` asks for others: the arrays are read
    as saved, checked, then cast, so the checksums see the bits that were written.
    """
    directory = workdir_fs.absolute(directory)
    item = workdir_fs.join(directory, "params")
    refuse_per_layer_layout(saved_tree(item), f"model checkpoint {item}")
    try:
        saved = json.loads(workdir_fs.read_text(workdir_fs.join(directory, CHECKSUMS)))
    except FileNotFoundError:
        raise DamagedModel(directory, f"its {CHECKSUMS} is missing (it was not saved completely)") from None
    except (OSError, ValueError) as err:
        raise DamagedModel(directory, f"its {CHECKSUMS} is unreadable ({first_line(err)})") from None
    as_saved = target if saved_dtypes is None else jax.tree.map(
        lambda t, s: jax.ShapeDtypeStruct(t.shape, s.dtype, sharding=t.sharding), target, saved_dtypes)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(item, as_saved)
    except Exception as err:
        raise DamagedModel(directory, f"orbax cannot read params/ ({first_line(err)})") from None
    wrong = mismatches(saved, nnx.to_pure_dict(restored))
    if wrong:
        raise DamagedModel(directory, f"checksum mismatch in {len(wrong)} arrays, e.g. {wrong[0]}")
    if saved_dtypes is None:
        return restored
    shardings = jax.tree.map(lambda t: t.sharding, target)
    return jax.jit(lambda tree: jax.tree.map(lambda x, t: x.astype(t.dtype), tree, target),
                   out_shardings=shardings)(restored)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) that tell orbax where to place restored arrays."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )


# ------------------------------------------------------------------ layout
def refuse_per_layer_layout(saved: Any, where: str) -> None:
    """UserInputError if a saved tree (orbax tree metadata) keeps its layers per index, not stacked."""
    for path, _ in jax.tree_util.tree_leaves_with_path(saved):
        hit = _PER_LAYER.search(jax.tree_util.keystr(path))
        if hit:
            raise UserInputError(
                f"{where} has the old per-layer parameter layout ({hit[1]}/{hit[2]}/...); this version stacks "
                f"the layers ({hit[1]}/... [layers, ...]) and cannot restore it: retrain, or export it to Hugging "
                "Face format with the clue_jax version that wrote it and load that")


def saved_tree(path: str) -> Any:
    """The tree metadata (paths, shapes) of an orbax PyTree item, without reading arrays; None if unreadable."""
    try:
        with ocp.StandardCheckpointer() as ckpt:
            saved = ckpt.metadata(path)
        return getattr(saved, "item_metadata", saved)  # a StepMetadata (newer orbax) wraps the tree
    except Exception:  # an unreadable item is reported by the restore that follows
        return None


# ------------------------------------------------------------------ checksums
def checksums(tree: Any) -> dict[str, int]:
    """A position-weighted uint32 sum of every leaf's bits, keyed by its tree path.

    Any single flipped bit changes it; computed under jit on the arrays' own
    shardings, so no host ever holds a whole leaf.
    """
    values = _checksum_tree(tree)
    return {jax.tree_util.keystr(path): int(np.asarray(v.addressable_shards[0].data))
            for path, v in jax.tree_util.tree_leaves_with_path(values)}


def mismatches(saved: dict, tree: Any) -> list[str]:
    """The tree paths whose checksum differs from `saved` (or that only one side has), sorted."""
    now = checksums(tree)
    return [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]


def _leaf_checksum(x: jax.Array) -> jax.Array:
    size = jnp.dtype(x.dtype).itemsize
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size])
    bits = bits.astype(jnp.uint32)
    index = jnp.zeros(bits.shape, jnp.uint32)  # row-major position, without reshaping (no resharding)
    for dim in range(bits.ndim):
        index = index * jnp.uint32(bits.shape[dim]) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim)
    return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


_checksum_tree = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def first_line(err: BaseException) -> str:
    """An error's first line (at most 200 characters), for one-line messages."""
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]
