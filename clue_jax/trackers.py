"""Where a run's scalars go: metrics.jsonl always, plus the trackers `logging.trackers` names.

Every tracker has the same three calls -- `write_scalars(step, scalars)`,
`write_hparams(hparams)`, `close()` -- so the trainer and the pipelines write
once and each tracker stores it its own way:

- `metrics.jsonl`: one JSON object a line, keyed by run id, stage and step;
- "tensorboard": tensorboardX event files (tags `train/...`, `eval/...`);
- "wandb": a Weights & Biases run per stage, grouped by run id (the `[wandb]` extra;
  `WANDB_MODE=offline` keeps it on disk).

tensorboardX and wandb are imported only when named, so an image without them
runs with `--config.logging.trackers="()"`.
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Protocol

from clue_jax.errors import UserInputError

NAMES = ("tensorboard", "wandb")
DEFAULT = ("tensorboard",)
DEFAULT_PROJECT = "clue-jax"
_PACKAGES = {"tensorboard": ("tensorboardX", "pip install tensorboardX"),
             "wandb": ("wandb", "pip install 'clue-jax[wandb]'")}


class Tracker(Protocol):
    def write_scalars(self, step: int, scalars: dict[str, float]) -> None: ...

    def write_hparams(self, hparams: dict) -> None: ...

    def close(self) -> None: ...


def problem(names) -> str | None:
    """What is wrong with a `logging.trackers` value (None when nothing): unknown, repeated or not installed."""
    if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
        return f"must be a tuple of tracker names from {', '.join(NAMES)} (or () for metrics.jsonl alone)"
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        return f"unknown tracker {unknown[0]!r}; known: {', '.join(NAMES)}"
    if len(set(names)) < len(names):
        return "names a tracker twice"
    for name in names:
        module, install = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            return f"tracker {name!r} needs {module}, which is not installed: {install}, or leave {name!r} out"
    return None


def configured(config) -> tuple[tuple[str, ...], str]:
    """(tracker names, W&B project) of a run's config; a config without a `logging` section gets the defaults.
    Refuses a bad name in one line."""
    section = config.get("logging") or {}
    names = tuple(section.get("trackers", DEFAULT))
    bad = problem(names)
    if bad:
        raise UserInputError(f"--config.logging.trackers={names}: {bad}")
    return names, str(section.get("wandb_project", DEFAULT_PROJECT))


def hparams_table(hparams: dict) -> str:
    """Markdown table of the flattened hyper-parameters (TensorBoard's TEXT tab renders it)."""
    rows = [f"| {key} | {json.dumps(value, default=str)} |" for key, value in sorted(flatten(hparams).items())]
    return "\n".join(["| key | value |", "|---|---|", *rows])


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class JsonlTracker:
    """metrics.jsonl: `{"run": id, "stage": name, "step": n, ...}` a line.

    `forget_after(step)` drops this run's and stage's lines past a resumed step (what the killed run logged
    after its last checkpoint), so each (run, stage, step) is logged once; other runs' lines stay as written.
    """

    def __init__(self, path: str, run_id: str | None, stage: str):
        self.path, self.run_id, self.stage = path, run_id, stage

    def forget_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        before = len(lines)
        if lines and not lines[-1].endswith("\n"):
            lines.pop()  # cut by a kill mid-write: the next line would join it
        kept = [line for line in lines if not self._ours_after(line, step)]
        if len(kept) < before:
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)

    def _ours_after(self, line: str, step: int) -> bool:
        try:
            record = json.loads(line)
        except ValueError:
            return False  # not a record this writer made: kept as found
        return (isinstance(record, dict) and record.get("run") == self.run_id and record.get("stage") == self.stage
                and isinstance(record.get("step"), int) and record["step"] > step)

    def write_scalars(self, step: int, scalars: dict) -> None:
        record = {"run": self.run_id, "stage": self.stage, "step": int(step), **scalars}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_hparams(self, hparams: dict) -> None:
        """config.json holds them; metrics.jsonl keeps to scalars."""

    def close(self) -> None:
        """Every line is closed as it is written."""


class TensorBoardTracker:
    """Event files in `logdir`; `purge_step` hides what a killed run logged from that step on."""

    def __init__(self, logdir: str, purge_step: int | None = None):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise UserInputError("logging.trackers names 'tensorboard' but tensorboardX is not installed: "
                                 "pip install tensorboardX, or set --config.logging.trackers=\"()\"") from None
        self._writer = SummaryWriter(logdir, purge_step=purge_step)

    def write_scalars(self, step: int, scalars: dict) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)

    def write_hparams(self, hparams: dict) -> None:
        self._writer.add_text("hparams", hparams_table(hparams), 0)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    """One W&B run per stage (id `<run id>-<stage>`, grouped by the run id); a resumed stage continues its run.
    W&B keeps its files in `directory`/wandb/."""

    def __init__(self, directory: str, project: str, run_id: str | None, stage: str):
        try:
            import wandb
        except ImportError:
            raise UserInputError("logging.trackers names 'wandb' but wandb is not installed: "
                                 "pip install 'clue-jax[wandb]', or leave 'wandb' out") from None
        safe = stage.replace("/", "_")
        self._run = wandb.init(project=project, dir=directory, name=safe, group=run_id, resume="allow",
                               id=f"{run_id}-{safe}" if run_id else None, reinit="finish_previous")

    def write_scalars(self, step: int, scalars: dict) -> None:
        self._run.log(scalars, step=int(step))

    def write_hparams(self, hparams: dict) -> None:
        self._run.config.update(flatten(hparams), allow_val_change=True)

    def close(self) -> None:
        """finish() can return before W&B's service has written the run's file; teardown waits for it, so the
        file is whole when a bucket workdir's copy is uploaded (the next stage's init starts the service again)."""
        import wandb

        self._run.finish()
        wandb.teardown()
