"""End-to-end jobs, one module each; `config.pipeline` names which one runs.

`run(config, workdir)` is the Python API and what the CLI calls: it writes the resolved config to
`workdir/config.running.json`, which becomes `config.json` once the run finished (so config.json always
matches summary.json), and, after the pipeline's tables, says when the config is a `:tiny` smoke test
whose numbers mean nothing.
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

    config_check.workdir_path(workdir).mkdir(parents=True, exist_ok=True)
    config_check.write_config(config, workdir)
    from clue_jax.pipelines.stages import rerun_damaged

    pipeline = importlib.import_module(PIPELINES[name])
    summary = rerun_damaged(lambda: pipeline.run(config, workdir))  # a damaged stage found late runs again
    config_check.finish_config(workdir)
    if config.get("smoke_test") and jax.process_index() == 0:
        print(SMOKE_TEST_NOTE)
    return summary
