"""notebooks/quickstart.ipynb runs top to bottom (tiny variant) in a real Jupyter kernel.

The parameters cell is overridden the papermill way: a cell with the test's
values is inserted right after the cell tagged "parameters".
"""
import os

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
    assert len(tagged) == 1 and "VARIANT" in tagged[0].source and "INSTALL" in tagged[0].source
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stored without outputs


@pytest.mark.slow
def test_notebook_runs_tiny_quickstart(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    params = (f'VARIANT = "tiny"\nWORKDIR = {str(tmp_path / "nb")!r}\nARMS = ("contrast",)\nINSTALL = False\n')
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(params))
    monkeypatch.setenv("CI", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, like a laptop or a CPU Colab
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
    client.execute()  # raises CellExecutionError on any failing cell

    images = [o for c in nb.cells for o in _outputs(c, {"display_data"}) if "image/png" in o.get("data", {})]
    assert len(images) == 1 and len(images[0]["data"]["image/png"]) > 1000
    text = "".join(o.get("text", "") for c in nb.cells for o in _outputs(c, {"stream"}))
    assert "top clues (d = s_large - s_small):" in text
    assert "QA exact match" in text and "| contrast" in text and "| base_small" in text
    assert (tmp_path / "nb" / "summary.json").exists() and (tmp_path / "nb" / "clue_heatmap.png").exists()
