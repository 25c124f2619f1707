"""Orbax checkpoints in the workdir: train state + JSON metadata, keep the last N.

A checkpoint holds the trainable params, the optimizer state, the step, the
RNG key and (in the metadata) the data position and the model config. At
save time the metadata also gets a checksum of every leaf (computed on the
devices, so nothing is gathered on one host); a restore recomputes them. The
newest sound step wins: a step that cannot be read (truncated file, missing
_METADATA, garbled meta) or whose checksums differ (flipped bytes) is moved
aside to `<checkpoints>.damaged/<step>` with a warning, so training goes on
from the previous step and can save that step again. A checkpoint written for
another model config is refused with a one-line error before anything is
overwritten, and so is one of the old per-layer parameter layout
(`blocks/0/...`, from before the layers were stacked and scanned): its paths
are read from the saved tree's metadata before anything is restored.
"""
from __future__ import annotations

import logging
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from clue_jax.config_check import workdir_path
from clue_jax.errors import UserInputError

log = logging.getLogger(__name__)

# Layer containers whose layers are stacked now (clue_jax.models.stacking); a
# saved path with a layer index right after one is the old per-layer layout.
PER_LAYER_CONTAINERS = ("blocks", "layers")  # the causal LM's and the encoder's layer stacks
_PER_LAYER = re.compile(r"\['(%s)'\]\['?(\d+)'?\]" % "|".join(PER_LAYER_CONTAINERS))


def refuse_per_layer_layout(saved_tree: Any, where: str) -> None:
    """UserInputError if a saved tree (orbax tree metadata) keeps its layers per index, not stacked."""
    for path, _ in jax.tree_util.tree_leaves_with_path(saved_tree):
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


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = workdir_path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> None:
        meta = {**meta, "checksums": checksums(state)}
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps(), reverse=True)

    def restore_latest(self, abstract_state: Any, expected_meta: dict) -> tuple[int, Any, dict] | None:
        """Returns (step, state, meta) of the newest readable checkpoint, or None.

        `expected_meta["model"]` must equal the saved model config, else the
        checkpoint belongs to another run: UserInputError (exit 2), nothing touched.
        """
        for step in self.steps():
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                if not isinstance(meta, dict):
                    raise ValueError(f"metadata is a {type(meta).__name__}, not a JSON object")
            except Exception as err:  # unreadable metadata: fall back to an older step
                self._set_aside(step, f"unreadable metadata ({_short(err)})")
                continue
            for key in ("model", "trainable"):
                if key in expected_meta and meta.get(key) != expected_meta[key]:
                    raise UserInputError(
                        f"checkpoint {self.directory}/{step} was written for another {key} config "
                        f"(saved {key}={_diff(meta.get(key), expected_meta[key])}); use a new --workdir"
                    )
            refuse_per_layer_layout(saved_tree(self.directory / str(step) / "state"),
                                    f"checkpoint {self.directory}/{step}")
            try:
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
                )["state"]
            except Exception as err:
                self._set_aside(step, f"corrupt or partial ({_short(err)})")
                continue
            wrong = _mismatches(meta.get("checksums"), restored)
            if wrong:
                self._set_aside(step, f"checksum mismatch in {len(wrong)} arrays, e.g. {wrong[0]}")
                continue
            return step, restored, meta
        return None

    def _set_aside(self, step: int, why: str) -> None:
        """Moves a damaged step out of the manager's sight (process 0), so the step can be saved again."""
        target = self.directory.parent / f"{self.directory.name}.damaged" / str(step)
        if jax.process_index() == 0:
            n = 1
            while target.exists():
                n += 1
                target = target.parent / f"{step}-{n}"
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        log.warning("checkpoint step %d in %s is damaged: %s; moved to %s, trying the previous step",
                    step, self.directory, why, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint-set-aside-{step}")
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def _diff(saved, expected) -> str:
    if isinstance(saved, dict) and isinstance(expected, dict):
        keys = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
        return ", ".join(f"{k}: {saved.get(k)!r} vs now {expected.get(k)!r}" for k in keys[:4])
    return f"{saved!r} vs now {expected!r}"


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) that tell orbax where to place restored arrays."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )


def checksums(state: Any) -> dict[str, int]:
    """A position-weighted uint32 sum of every leaf's bits, keyed by its tree path.

    Any single flipped bit changes it; computed under jit on the arrays' own
    shardings, so no host ever holds a whole leaf.
    """
    values = _checksum_tree(state)
    return {jax.tree_util.keystr(path): int(np.asarray(v.addressable_shards[0].data))
            for path, v in jax.tree_util.tree_leaves_with_path(values)}


def _mismatches(saved: dict | None, state: Any) -> list[str]:
    if saved is None:  # written before checksums existed
        return []
    now = checksums(state)
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
