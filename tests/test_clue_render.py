"""Clue pages and heatmaps are written, contain every token, and are real images."""
import numpy as np
import pytest

from clue_jax.clues import render
from clue_jax.errors import UserInputError

TOKENS = ["<s>", "Ada", " Love", "lace", " was", " born", " <b>&", ' "x"', ".", "\n"]


def _scores():
    rng = np.random.default_rng(0)
    s_large = rng.random(len(TOKENS)) / 10
    s_small = rng.random(len(TOKENS)) / 10
    return s_large, s_small, s_large - s_small


def test_render_html(tmp_path):
    s_large, s_small, d = _scores()
    path = render.render_html(TOKENS, s_large, s_small, d, str(tmp_path / "sub" / "clues.html"), title="A & B")
    page = open(path, encoding="utf-8").read()
    assert page.startswith("<!DOCTYPE html>") and "A &amp; B" in page
    assert page.count('class="t"') == len(TOKENS)
    for tok in TOKENS:
        assert f">{__import__('html').escape(tok)}</span>" in page
    assert "<b>&" not in page  # raw markup from a token never reaches the page
    i = int(np.argmax(d))
    assert f"d = {d[i]:+.5f}" in page and f"s_large = {s_large[i]:.5f}" in page
    # the most positive and most negative tokens get the two ends of the diverging scale
    import matplotlib
    red = matplotlib.colors.to_hex(matplotlib.colormaps["RdBu_r"](1.0))
    blue = matplotlib.colors.to_hex(matplotlib.colormaps["RdBu_r"](0.0))
    assert red in page and blue in page
    with pytest.raises(UserInputError, match="s_small"):
        render.render_html(TOKENS, s_large, s_small[:3], d, str(tmp_path / "x.html"))


def test_render_heatmap_png(tmp_path):
    s_large, s_small, d = _scores()
    path = render.render_heatmap_png(TOKENS, s_large, s_small, d, str(tmp_path / "clues.png"), title="t")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.shape[0] >= 300 and img.shape[1] >= 600
    assert img[..., :3].std() > 0.05  # not a blank canvas
    with pytest.raises(UserInputError, match="NaN"):
        render.render_heatmap_png(TOKENS, s_large, s_small, d * np.nan, str(tmp_path / "y.png"))


# analysis.py: the measures behind "the head entity is the clue", on hand-made arrays.
from clue_jax.clues import analysis  # noqa: E402


def test_name_share_in_top_contrast():
    d = np.array([[0.9, 0.1, 0.8, 0.0, 0.7, 5.0],
                  [0.0, 0.3, 0.3, 0.2, 0.1, 0.0],
                  [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    names = np.array([[1, 0, 1, 0, 0, 1], [0, 0, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    # example 0: top-2 real = positions 0, 2 (5.0 is padding) -> 2/2; example 1: tie .3/.3 -> 1, 2 -> 1/2;
    # example 2 has no real token and is left out.
    assert analysis.name_share_in_top_contrast(d, mask, names, k=2) == pytest.approx((1.0 + 0.5) / 2)
    # k larger than the real length: all 5 real tokens of ex. 0 (2 names), all 6 of ex. 1 (1 name)
    assert analysis.name_share_in_top_contrast(d, mask, names, k=10) == pytest.approx((2 / 5 + 1 / 6) / 2)
    assert analysis.name_share_by_chance(mask, names) == pytest.approx((2 / 5 + 1 / 6) / 2)
    with pytest.raises(UserInputError, match="attention_mask"):
        analysis.name_share_in_top_contrast(d, mask[:, :3], names)


def test_top_tokens_from_query():
    large = np.array([[0.5, 0.2, 0.1, 0.1, 0.1, 0.0], [0.3, 0.3, 0.2, 0.2, 0.0, 0.0]])
    small = np.array([[0.6, 0.0, 0.1, 0.2, 0.1, 0.0], [0.1, 0.1, 0.1, 0.7, 0.0, 0.0]])
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    names = np.array([[0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    # ex. 0, query 4: keys 0..3, d = -.1 .2 0 -.1 -> top-2 = 1, 2. ex. 1, query 3: keys 0..2, d = .2 .2 .1 -> 0, 1.
    out = analysis.top_tokens_from_query(large, small, mask, [4, 3], k=2, name_token_mask=names)
    np.testing.assert_array_equal(out["indices"], [[1, 2], [0, 1]])
    np.testing.assert_allclose(out["values"], [[0.2, 0.0], [0.2, 0.2]], atol=1e-12)
    assert out["name_share"] == pytest.approx((0.5 + 0.5) / 2)
    # excluding key 0 (an attention sink) and asking for more keys than there are candidates
    out = analysis.top_tokens_from_query(large, small, mask, [1, 3], k=3,
                                         exclude_mask=np.array([[0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]))
    np.testing.assert_array_equal(out["indices"], [[0, -1, -1], [1, 2, -1]])
    assert np.isnan(out["values"][0, 1]) and out["name_share"] is None
    assert analysis.name_share_by_chance(mask, names, query_index=[4, 3]) == pytest.approx((1 / 4 + 1 / 3) / 2)
    with pytest.raises(UserInputError, match="query_index"):
        analysis.top_tokens_from_query(large, small, mask, [6, 0])
