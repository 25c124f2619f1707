"""Looking at clues: which tokens the large teacher attends to more than the small one.

`render_html` writes one self-contained page (no scripts, no external files):
each token is coloured by the contrast d on a diverging scale centred at 0
(red: the large model attends more, blue: less) and its tooltip shows s_large,
s_small and d. The scale is a high percentile of |d| (values beyond it saturate):
with the maximum, one spike (often the token before <eos>) would wash every other
token, the name included, out to white. `render_heatmap_png` draws the three score rows under each
other for papers and notebooks.
"""
from __future__ import annotations

import html
from typing import Sequence

import numpy as np

from clue_jax import workdir_fs
from clue_jax.errors import UserInputError

_CMAP = "RdBu_r"
SCALE_PERCENTILE = 95.0


def contrast_scale(d, percentile: float = SCALE_PERCENTILE) -> float:
    """The colour scale of d: the `percentile` of |d| over the document (the maximum if that is 0; 1 if all is 0)."""
    a = np.abs(np.asarray(d, np.float64).reshape(-1))
    if not a.size:
        return 1.0
    scale = float(np.percentile(a, percentile))
    scale = scale if scale > 0 else float(a.max())
    return scale if scale > 0 else 1.0


def _rows(tokens: Sequence[str], s_large, s_small, d, where: str):
    arrays = [np.asarray(x, np.float64).reshape(-1) for x in (s_large, s_small, d)]
    for name, a in zip(("s_large", "s_small", "d"), arrays):
        if a.shape[0] != len(tokens):
            raise UserInputError(f"{where}: {name} has {a.shape[0]} values for {len(tokens)} tokens")
        if not np.all(np.isfinite(a)):
            raise UserInputError(f"{where}: {name} contains NaN or infinite values")
    return arrays


def _diverging_colours(d: np.ndarray, scale: float) -> list[str]:
    from matplotlib import colormaps, colors

    rgba = colormaps[_CMAP]((np.clip(d / scale, -1.0, 1.0) + 1.0) / 2.0)
    return [colors.to_hex(c) for c in rgba]


def _text_colour(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "#fff"


def render_html(tokens: Sequence[str], s_large, s_small, d, path: str, title: str = "clues",
                marked: Sequence[bool] | None = None) -> str:
    """Writes the page to `path` and returns the path. Tokens are shown as given (decoded), escaped;
    `marked` tokens (e.g. the gate's targets) are boxed."""
    s_large, s_small, d = _rows(tokens, s_large, s_small, d, f"render_html({path})")
    marked = [False] * len(tokens) if marked is None else [bool(m) for m in marked]
    if len(marked) != len(tokens):
        raise UserInputError(f"render_html({path}): {len(marked)} marks for {len(tokens)} tokens")
    scale = contrast_scale(d)
    fills = _diverging_colours(d, scale)
    spans = []
    for i, (tok, fill) in enumerate(zip(tokens, fills)):
        tip = f"#{i} {tok!r}\ns_large = {s_large[i]:.5f}\ns_small = {s_small[i]:.5f}\nd = {d[i]:+.5f}"
        spans.append(
            f'<span class="t{" m" if marked[i] else ""}" style="background:{fill};color:{_text_colour(fill)}" '
            f'title="{html.escape(tip, quote=True)}">{html.escape(tok)}</span>'
        )
    legend_stops = np.linspace(-1.0, 1.0, 9)
    legend_fills = _diverging_colours(legend_stops, 1.0)
    legend = "".join(
        f'<span class="l" style="background:{c};color:{_text_colour(c)}">{v * scale:+.3g}</span>'
        for v, c in zip(legend_stops, legend_fills)
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; line-height: 2.1; }}
.t {{ white-space: pre-wrap; padding: 2px 1px; border-radius: 3px; font-family: monospace; }}
.t:hover {{ outline: 2px solid #333; }}
.m {{ border: 2px solid #000; }}
.l {{ display: inline-block; min-width: 4.5em; text-align: center; font-size: 80%; }}
.legend {{ line-height: 1.5; margin-bottom: 1.5em; }}
</style></head><body>
<h2>{html.escape(title)}</h2>
<div class="legend">d = s_large - s_small (hover a token for its scores; the ends of the scale are the
{SCALE_PERCENTILE:g}th percentile of |d|, larger values saturate):<br>{legend}<br>
red: the large model attends more (a clue); blue: the small model attends more.{
"<br>boxed: the target tokens." if any(marked) else ""}</div>
<div class="text">{"".join(spans)}</div>
</body></html>
"""
    workdir_fs.write_text(path, page)
    return path


def render_heatmap_png(tokens: Sequence[str], s_large, s_small, d, path: str, title: str | None = None) -> str:
    """Writes a 3-row heatmap (s_large, s_small, d) with token labels on x; returns the path.

    d's colours span +-contrast_scale(d) (a percentile, larger values saturate: the colour bar's arrows).
    """
    s_large, s_small, d = _rows(tokens, s_large, s_small, d, f"render_heatmap_png({path})")
    # A bare Figure on the Agg canvas: no pyplot, so a notebook's backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(tokens)
    fig = Figure(figsize=(min(max(6.0, 0.28 * n), 80.0), 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    top = max(float(np.max(s_large)), float(np.max(s_small)), 1e-12) if n else 1.0
    scale = contrast_scale(d)
    rows = [("s_large", s_large, "viridis", 0.0, top), ("s_small", s_small, "viridis", 0.0, top),
            ("d", d, _CMAP, -scale, scale)]
    for ax, (name, values, cmap, lo, hi) in zip(axes, rows):
        im = ax.imshow(values[None, :], aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_yticks([0])
        ax.set_yticklabels([name])
        fig.colorbar(im, ax=ax, pad=0.01, fraction=0.03, extend="both" if name == "d" else "neither")
    axes[-1].set_xticks(np.arange(n))
    axes[-1].set_xticklabels([t.replace("\n", "\\n") for t in tokens], rotation=90, fontsize=7)
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    workdir_fs.savefig(fig, path, dpi=110)
    return path
