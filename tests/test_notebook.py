"""notebooks/quickstart.ipynb runs top to bottom (tiny variant) in a real Jupyter kernel, outside a checkout.

The parameters cell is overridden the papermill way: a cell with the test's
values is inserted right after the cell tagged "parameters". The install cell's
three ways (checkout, INSTALL_FROM as on Colab, neither) are run on their own.
"""
import importlib.util
import os
import subprocess

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def _outputs(cell, kind):
    return [o for o in cell.get("outputs", []) if o.get("output_type") in kind]


def test_notebook_is_valid_and_parameterised():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "VARIANT" in tagged[0].source and "INSTALL_FROM" in tagged[0].source
    assert "SystemExit" not in "".join(c.source for c in nb.cells)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stored without outputs


def _install_cell(cwd, monkeypatch, importable: bool, install_from: str = ""):
    """Runs the notebook's install cell in `cwd` with pip recorded, not run; returns the pip commands."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and "checkout_root" in c.source]
    calls = []
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: calls.append(cmd))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: real(name, *a) if importable or name != "clue_jax" else None)
    exec(compile(cell.source, "install_cell", "exec"), {"INSTALL": True, "INSTALL_FROM": install_from})
    return calls


def test_install_cell_checkout_colab_and_neither(tmp_path, monkeypatch):
    assert _install_cell(os.path.join(ROOT, "notebooks"), monkeypatch, importable=True) == []
    (pip,) = _install_cell(os.path.join(ROOT, "notebooks"), monkeypatch, importable=False)
    assert pip[-2:] == ["-e", ROOT]
    url = "git+https://example.org/me/clue_jax.git"
    (pip,) = _install_cell(tmp_path, monkeypatch, importable=False, install_from=url)  # Colab: no checkout
    assert pip[-1] == url and pip[1:4] == ["-m", "pip", "install"]
    with pytest.raises(RuntimeError, match="set INSTALL_FROM in the parameters cell"):
        _install_cell(tmp_path, monkeypatch, importable=False)


@pytest.mark.slow
def test_notebook_runs_tiny_quickstart_outside_a_checkout(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    params = (f'VARIANT = "tiny"\nWORKDIR = {str(tmp_path / "nb")!r}\nARMS = ("contrast",)\nINSTALL = True\n'
              'INSTALL_FROM = ""\n')
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(params))
    monkeypatch.setenv("CI", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))  # "installed"
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, like a laptop or a CPU Colab
    elsewhere = tmp_path / "elsewhere"  # no configs/, no ../pyproject.toml: the packaged config is used
    elsewhere.mkdir()
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(elsewhere)}})
    client.execute()  # raises CellExecutionError on any failing cell

    images = [o for c in nb.cells for o in _outputs(c, {"display_data"}) if "image/png" in o.get("data", {})]
    assert len(images) == 1 and len(images[0]["data"]["image/png"]) > 1000
    text = "".join(o.get("text", "") for c in nb.cells for o in _outputs(c, {"stream"}))
    assert "top clues (d = s_large - s_small):" in text
    assert "QA exact match" in text and "| contrast" in text and "| base_small" in text
    assert text.count("QA exact match") == 1 and text.count("Cloze exact match") == 1  # the table, once
    assert text.count("is a smoke test") == 1
    for name in ("summary.json", "config.json", "clue_heatmap.png"):
        assert (tmp_path / "nb" / name).exists(), name
