"""Orbax checkpoints in the workdir: train state + JSON metadata, keep the last N.

A checkpoint holds the trainable params, the optimizer state, the step, the
RNG key and (in the metadata) the data position, the model config and the
metrics logged at that step. At save time the metadata also gets a checksum
of every leaf (clue_jax.models.store's, the one checksum of every array the
project saves; computed on the devices, so nothing is gathered on one host);
a restore recomputes them. A write that fails (full disk, permission) raises
an OSError naming the step, at the save or at the next wait. The
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
from typing import Any

import jax
import orbax.checkpoint as ocp

from clue_jax.config_check import workdir_path
from clue_jax.errors import UserInputError
from clue_jax.models.orbax_errors import write_errors
from clue_jax.models.store import checksums, first_line, mismatches, refuse_per_layer_layout, saved_tree

log = logging.getLogger(__name__)

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
        """Saves in the background; a write error (full disk, permission) surfaces here or at the next wait."""
        meta = {**meta, "checksums": checksums(state)}
        with write_errors(self.directory / str(step)):  # the previous step's background write ends here
            self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=force,
            )

    def wait(self) -> None:
        with write_errors(self.directory):
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
                self._set_aside(step, f"unreadable metadata ({first_line(err)})")
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
                self._set_aside(step, f"corrupt or partial ({first_line(err)})")
                continue
            wrong = [] if meta.get("checksums") is None else mismatches(meta["checksums"], restored)
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
        try:
            self.wait()
        finally:
            self.manager.close()


def _diff(saved, expected) -> str:
    if isinstance(saved, dict) and isinstance(expected, dict):
        keys = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
        return ", ".join(f"{k}: {saved.get(k)!r} vs now {expected.get(k)!r}" for k in keys[:4])
    return f"{saved!r} vs now {expected!r}"
