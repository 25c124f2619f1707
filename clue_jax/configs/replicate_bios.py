"""Replication of the clue-dropout comparison (the paper's Table 2) on the biography world.

    python -m clue_jax.main --config configs/replicate_bios.py --workdir runs/replicate
    python -m clue_jax.main --config configs/replicate_bios.py:tiny --workdir /tmp/rep_tiny   # tests

Four arms x {small, large} students x 3 seeds; alpha/beta per method chosen on
30 held-out dev people (70 test people); writes replication.md and em_vs_distance.png.
It shares the quickstart's world, tokenizer and base models settings, so the
two pipelines give the same base models for the same settings.
"""
import ml_collections

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("quickstart", os.path.join(os.path.dirname(__file__), "quickstart.py"))
_quickstart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_quickstart)


VARIANTS = ("", "tiny")  # "" = the default; listed by --help


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = _quickstart.get_config("tiny" if variant == "tiny" else "")
    c.pipeline = "replicate"
    c.seeds = (0, 1, 2)
    c.students = ("small", "large")
    c.data.num_dev = 30  # of the quickstart's 100 new people; same world, so a shared workdir reuses its base models
    c.clues.arms = ("plain", "random", "attention", "contrast")
    c.clues.render_examples = 4
    c.grid = dict(enabled=True, alphas=(0.6, 0.7), betas=(0.01, 0.05), seed=0)
    if variant == "tiny":
        c.seeds = (0, 1)
        c.data.num_dev = 3
        c.grid.update(alphas=(0.7,), betas=(0.01, 0.05))
        c.clues.render_examples = 1
    elif variant:
        raise ValueError(f"unknown variant {variant!r} for configs/replicate_bios.py (have: tiny)")
    return c
