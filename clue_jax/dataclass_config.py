"""Frozen dataclass settings built from a config dict: a key the dataclass does not have is refused, never ignored."""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from clue_jax.errors import UserInputError

T = TypeVar("T")


def from_dict(cls: type[T], values: dict[str, Any], where: str) -> T:
    """`cls(**values)`, or a one-line error naming the unknown keys, `where` they came from and the valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserInputError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(names)}")
    return cls(**values)
