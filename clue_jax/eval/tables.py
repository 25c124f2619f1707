"""Markdown tables and 'mean ± std' cells: how every report of the project prints its numbers."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *[line(r) for r in rows]])


def mean_std(values: Sequence[float], digits: int = 2) -> str:
    """'mean ± sample std' (ddof=1, as over seeds); the mean alone for one value; missing values (None, NaN)
    are left out, and 'n/a' stands for none."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "n/a"
    text = f"{np.mean(values):.{digits}f}"
    return text + (f" ± {np.std(values, ddof=1):.{digits}f}" if len(values) > 1 else "")
