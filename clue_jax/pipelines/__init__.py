"""End-to-end jobs, one module each; `config.pipeline` names which one runs."""
from __future__ import annotations

import importlib

from clue_jax.errors import UserInputError

PIPELINES = {
    "knowledge": "clue_jax.pipelines.knowledge",
    "replicate": "clue_jax.pipelines.replicate",
    "extraction": "clue_jax.pipelines.extraction",
    "mcl": "clue_jax.pipelines.mcl",
}


def run(config, workdir: str) -> dict:
    name = config.get("pipeline")
    if name not in PIPELINES:
        raise UserInputError(f"config.pipeline={name!r} is not one of {sorted(PIPELINES)}")
    return importlib.import_module(PIPELINES[name]).run(config, workdir)
