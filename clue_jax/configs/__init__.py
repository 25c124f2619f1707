"""The shipped configs, inside the package so that an installed wheel has them too.

A checkout's `configs/` is a link to this directory, so `--config configs/quickstart.py`,
`--config quickstart` and an installed `clue-jax --config quickstart` read the same file.
Each config file has a docstring (its first line is its summary), `VARIANTS` and
`get_config(variant)`; files whose name starts with "_" are shared pieces, not configs.
`--help` lists what is here, so a new config file shows up there by itself.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

DIR = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass(frozen=True)
class ConfigInfo:
    name: str
    path: str
    summary: str  # the docstring's first line
    variants: tuple[str, ...]  # "" = the default variant
    pipeline: str


def names() -> list[str]:
    """The configs shipped here, by file name without `.py`."""
    return sorted(f[:-3] for f in os.listdir(DIR) if f.endswith(".py") and not f.startswith("_"))


def path(name: str) -> str:
    return os.path.join(DIR, f"{name}.py")


def load_module(name: str):
    """The config file as a module (loaded by path, as ml_collections' --config loads it)."""
    spec = importlib.util.spec_from_file_location(f"clue_jax_config_{name}", path(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(name: str, variant: str = ""):
    """`get_config(variant)` of a shipped config, e.g. `get_config("quickstart", "tiny")`."""
    if name not in names():
        from clue_jax.errors import UserInputError

        raise UserInputError(f"no shipped config {name!r}; have: {', '.join(names())}")
    return load_module(name).get_config(variant)


def info(name: str) -> ConfigInfo:
    module = load_module(name)
    summary = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
    return ConfigInfo(name=name, path=path(name), summary=summary, variants=tuple(module.VARIANTS),
                      pipeline=str(module.get_config("").pipeline))


def catalogue() -> list[ConfigInfo]:
    return [info(n) for n in names()]


def resolve_argv(argv: list[str]) -> list[str]:
    """`--config NAME[:variant]` -> the shipped file's path, when NAME is no file but a shipped config."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + _resolve(arg[len("--config="):])
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = _resolve(out[i + 1])
    return out


def missing_file_hint(filename: str | None) -> str | None:
    """A --config file that does not exist from here: how to name a shipped config instead (None: it exists)."""
    if not filename or os.path.exists(filename):
        return None
    stem = os.path.splitext(os.path.basename(filename))[0]
    example = stem if stem in names() else "quickstart"
    return (f"no config file {filename!r} (from {os.getcwd()}); a shipped config is named without a path or .py, "
            f"e.g. --config {example}:tiny (shipped: {', '.join(names())})")


def _resolve(value: str) -> str:
    name, sep, variant = value.partition(":")
    if os.path.exists(name) or name not in names():
        return value
    return path(name) + sep + variant
