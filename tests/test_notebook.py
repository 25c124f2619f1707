"""notebooks/quickstart.ipynb runs top to bottom (tiny variant) in a real Jupyter kernel, outside a checkout.

The parameters cell is overridden the papermill way: a cell with the test's
values is inserted right after the cell tagged "parameters" (TensorBoard is not
started: it is a server). The install cell's ways (checkout, INSTALL_FROM as on
Colab, neither, and an accelerator jax kept) are run on their own.
"""
import importlib.metadata
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


def _install_cell(cwd, monkeypatch, importable: bool, install_from: str = "", backend: str = "cpu"):
    """Runs the notebook's install cell in `cwd` with pip recorded, not run, and the installed jax's backend
    reported as `backend`; returns the pip commands."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and "checkout_root" in c.source]
    calls = []

    def run(cmd, check=False, capture_output=False, text=False):
        if cmd[1:3] == ["-m", "pip"]:
            calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=f"W0000 a warning\n{backend}\n", stderr="")

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(subprocess, "run", run)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: real(name, *a) if importable or name != "clue_jax" else None)
    exec(compile(cell.source, "install_cell", "exec"), {"INSTALL": True, "INSTALL_FROM": install_from})
    return calls


def test_install_cell_checkout_colab_and_neither(tmp_path, monkeypatch):
    assert _install_cell(os.path.join(ROOT, "notebooks"), monkeypatch, importable=True) == []
    (pip,) = _install_cell(os.path.join(ROOT, "notebooks"), monkeypatch, importable=False)
    assert pip[-2:] == ["-e", ROOT] and "-c" not in pip  # a CPU jax: nothing to keep
    url = "git+https://example.org/me/clue_jax.git"
    (pip,) = _install_cell(tmp_path, monkeypatch, importable=False, install_from=url)  # Colab: no checkout
    assert pip[-1] == url and pip[1:4] == ["-m", "pip", "install"] and "-c" not in pip
    with pytest.raises(RuntimeError, match="set INSTALL_FROM in the parameters cell"):
        _install_cell(tmp_path, monkeypatch, importable=False)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_install_cell_keeps_an_accelerator_jax(tmp_path, monkeypatch, backend):
    """A Colab GPU/TPU runtime's jax is pinned for pip, so installing clue_jax cannot replace it."""
    url = "git+https://example.org/me/clue_jax.git"
    (pip,) = _install_cell(tmp_path, monkeypatch, importable=False, install_from=url, backend=backend)
    assert pip[-1] == url and pip[1:4] == ["-m", "pip", "install"]
    constraints = pip[pip.index("-c") + 1]
    pins = open(constraints).read().split()
    assert f"jax=={importlib.metadata.version('jax')}" in pins
    assert f"jaxlib=={importlib.metadata.version('jaxlib')}" in pins


@pytest.mark.slow
def test_notebook_runs_tiny_quickstart_outside_a_checkout(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    params = (f'VARIANT = "tiny"\nWORKDIR = {str(tmp_path / "nb")!r}\nARMS = ("contrast",)\nINSTALL = True\n'
              'INSTALL_FROM = ""\nSHOW_TENSORBOARD = False\nOWN_CORPUS = True\nEXPORT = True\n')
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

    views = [o["data"]["text/html"] for c in nb.cells for o in _outputs(c, {"display_data"})
             if "text/html" in o.get("data", {})]
    assert len(views) == 1 and "clues: " in views[0] and "<span" in views[0]  # the pipeline's own clue view
    text = "".join(o.get("text", "") for c in nb.cells for o in _outputs(c, {"stream"}))
    assert "backend cpu: 1 device(s)" in text
    assert "Cloze exact match" in text and "| contrast" in text and "| base_small" in text
    assert "TensorBoard runs: " in text and "'eval'" in text
    assert "the 4 questions of qa.jsonl" in text  # the own-corpus run's table
    assert "exported cpt_small_contrast_s0 to " in text and "LlamaForCausalLM" in text
    for name in ("summary.json", "config.json", "clues/example_0.html"):
        assert (tmp_path / "nb" / name).exists(), name
    assert (tmp_path / "nb_own_corpus" / "run" / "summary.json").exists()
    assert (tmp_path / "nb_hf" / "cpt_small_contrast_s0" / "config.json").exists()
