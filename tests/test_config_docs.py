"""docs/configs.md is what `python -m clue_jax.config_docs` writes, and every shipped key has a meaning."""
import os

from clue_jax import config_docs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _all_keys() -> set[str]:
    return {k for variants in config_docs.shipped_keys().values() for keys in variants.values() for k in keys}


def test_every_key_of_every_shipped_config_has_a_meaning():
    assert sorted(k for k in _all_keys() if not config_docs.describe(k)) == []


def test_no_meaning_is_left_for_a_key_no_config_has():
    keys = _all_keys()
    assert sorted(k for k in config_docs.DESCRIPTIONS if k not in keys) == []
    sections = {k.split(".", 1)[0] for k in keys}
    assert sorted(s for s in config_docs.TRAIN_SECTIONS if s not in sections) == []
    rests = {k.split(".", 1)[1] for k in keys if k.split(".", 1)[0] in config_docs.TRAIN_SECTIONS}
    assert sorted(k for k in config_docs.TRAIN_KEYS if k not in rests) == []
    model_keys = {k.split(".")[2] for k in keys if k.startswith("models.")}
    assert sorted(k for k in config_docs.MODEL_KEYS if k not in model_keys) == []


def test_describe_knows_the_shared_tables_and_nothing_else():
    assert config_docs.describe("cpt.lr").startswith("peak learning rate")
    assert "the large teacher" in config_docs.describe("models.large.d_model")
    assert config_docs.describe("cpt.lrr") is None and config_docs.describe("models.medium.d_model") is None


def test_the_committed_page_is_the_generators_output(monkeypatch):
    monkeypatch.setenv("CLUE_JAX_TINY_CKPTS", "/somewhere/else")  # the page must not depend on it
    page = open(os.path.join(ROOT, "docs", "configs.md"), encoding="utf-8").read()
    assert page == config_docs.render(), "regenerate: python -m clue_jax.config_docs > docs/configs.md"
    for name in ("quickstart", "replicate_bios", "mcl_compare"):
        assert f"\n## {name}\n" in page
    assert "| `clues.chosen.contrast.beta` | `0.005` |" in page
