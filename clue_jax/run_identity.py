"""What made a run: the code's git commit and the library versions, recorded in config.json and summary.json.

The commit is None outside a git checkout (an installed wheel); "dirty" says whether tracked files differed
from it. Versions come from the installed distributions' metadata, so nothing heavy is imported.
"""
from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@functools.cache
def identity() -> dict:
    """{"commit", "dirty", "versions"} of this process's code (computed once a process)."""
    commit, dirty = _git_state(os.path.dirname(_PACKAGE_DIR))
    versions = {"python": platform.python_version(), "clue-jax": _version("clue-jax")}
    versions.update({name: _version(name) for name in PACKAGES})
    return {"commit": commit, "dirty": dirty, "versions": versions}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_state(root: str) -> tuple[str | None, bool | None]:
    """(commit, dirty) when `root` (the directory holding clue_jax/) is a git checkout's top; else (None, None),
    so a wheel installed in a virtualenv that sits inside some other repository claims no commit."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or os.path.realpath(top) != os.path.realpath(root):
        return None, None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, (None if status is None else bool(status))
