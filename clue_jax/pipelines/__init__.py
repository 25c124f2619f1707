"""End-to-end jobs, one module each; `config.pipeline` names which one runs.

`run(config, workdir)` is the Python API and what the CLI calls: it writes the resolved config to
`workdir/config.running.json` with the run's record (id, commit, versions), which becomes `config.json`
once the run finished (so config.json always matches summary.json) and is removed when the run is refused as
bad input (a diverged loss keeps it), runs the pipeline inside that run (its id keys every metrics line),
and, after the pipeline's tables, says when the config is a `:tiny` smoke test whose numbers mean nothing.
"""
from __future__ import annotations

import importlib

from clue_jax.errors import UserInputError

PIPELINES = {
    "knowledge": "clue_jax.pipelines.knowledge",
    "replicate": "clue_jax.pipelines.replicate",
    "extraction": "clue_jax.pipelines.extraction",
    "mcl": "clue_jax.pipelines.mcl",
}


SMOKE_TEST_NOTE = ("note: a :tiny variant is a smoke test (seconds of training on a toy world): "
                   "its numbers mean nothing; drop :tiny for a real run.")


def run(config, workdir: str) -> dict:
    name = config.get("pipeline")
    if name not in PIPELINES:
        raise UserInputError(f"config.pipeline={name!r} is not one of {sorted(PIPELINES)}")
    import jax

    from clue_jax import config_check
    from clue_jax.train import logging_utils

    run = logging_utils.Run.of(config)  # refuses unknown or missing trackers before anything is written
    config_check.workdir_path(workdir).mkdir(parents=True, exist_ok=True)
    config_check.write_config(config, workdir, run=run.record())
    from clue_jax.pipelines.stages import rerun_damaged
    from clue_jax.train.loop import NonFiniteLoss

    pipeline = importlib.import_module(PIPELINES[name])
    try:
        with logging_utils.current_run(run):  # a damaged stage found late runs again
            summary = rerun_damaged(lambda: pipeline.run(config, workdir))
    except NonFiniteLoss:  # this config trained and diverged: its record stays beside the stopped stage
        raise
    except UserInputError:  # refused (a checkpoint or document that does not fit): this config did not run
        config_check.discard_running_config(workdir)
        raise
    config_check.finish_config(workdir)
    if config.get("smoke_test") and jax.process_index() == 0:
        print(SMOKE_TEST_NOTE)
    return summary
