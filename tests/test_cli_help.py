"""`--help` lists the flags and every shipped config; a wheel ships the configs."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from clue_jax import cli_help, configs, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(pythonpath: str) -> dict:
    return {**os.environ, "PYTHONPATH": pythonpath, "JAX_PLATFORMS": "cpu"}


def _checkout_configs() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                  if f.endswith(".py") and not f.startswith("_"))


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_0_with_flags_configs_variants_pipelines_and_an_example(flag):
    out = subprocess.run([sys.executable, "-m", "clue_jax.main", flag], cwd=ROOT, env=_env(ROOT),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Unknown command line flag" not in out.stderr
    text = out.stdout
    for expected in ("--config CONFIG[:VARIANT]", "--config.KEY=VALUE", "--workdir", "--distributed {auto,on,off}",
                     "example:", cli_help.EXAMPLE):
        assert expected in text
    names = _checkout_configs()
    assert len(names) >= 7 and "_hf_recipe" not in text
    for name in names:
        line = next(line for line in text.splitlines() if line.startswith(f"  {name} "))
        assert "pipeline " in line and "variants (default), :tiny" in line
    assert "pipeline mcl;" in text and "pipeline extraction;" in text and "pipeline replicate;" in text


def test_console_entry_point_help_exits_0():
    code = "import sys; sys.argv = ['clue-jax', '--help']; from clue_jax.main import run; run()"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(ROOT), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "quickstart" in out.stdout and "example:" in out.stdout


def test_help_lists_what_the_config_directory_holds(tmp_path, monkeypatch):
    """The list comes from the files (docstring, VARIANTS, pipeline), not from a list in the code."""
    (tmp_path / "mine.py").write_text('"""My own run: a line of summary.\n\nMore text."""\nimport ml_collections\n'
                                      'VARIANTS = ("", "small", "big")\n\n'
                                      'def get_config(variant=""):\n'
                                      '    return ml_collections.ConfigDict(dict(pipeline="mcl"))\n')
    (tmp_path / "_shared.py").write_text("X = 1\n")
    monkeypatch.setattr(configs, "DIR", str(tmp_path))
    text = cli_help.help_text(main)
    assert "  mine  " in text and "pipeline mcl; variants (default), :small, :big. My own run: a line of summary." in text
    assert "_shared" not in text and "  quickstart " not in text


def test_config_by_name_resolves_to_the_shipped_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    qs = configs.path("quickstart")
    assert configs.resolve_argv(["x", "--config", "quickstart:tiny", "--workdir", "w"])[2] == qs + ":tiny"
    assert configs.resolve_argv(["x", "--config=quickstart"]) == ["x", f"--config={qs}"]
    # a path, or a name that is no shipped config, is passed on unchanged (absl reports what is wrong)
    assert configs.resolve_argv(["x", "--config=configs/quickstart.py:tiny"])[1] == "--config=configs/quickstart.py:tiny"
    assert configs.resolve_argv(["x", "--config", "quickstrat"])[2] == "quickstrat"
    (tmp_path / "quickstart").write_text("")  # a local file of that name wins
    assert configs.resolve_argv(["x", "--config", "quickstart"])[2] == "quickstart"
    # the checkout's configs/ and the packaged ones are the same files
    assert os.path.samefile(os.path.join(ROOT, "configs", "quickstart.py"), qs)
    assert configs.get_config("quickstart", "tiny").world.num_background == 24


def test_wheel_ships_the_configs_and_runs_outside_a_checkout(tmp_path):
    """`pip install .` has no checkout: the configs must be inside the package, and --help / --config NAME work."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "clue_jax"), src / "clue_jax", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("clue_jax-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if n.startswith("clue_jax/configs/")}
    assert {f"clue_jax/configs/{n}.py" for n in _checkout_configs() + ["_hf_recipe"]} <= shipped

    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    out = subprocess.run([sys.executable, "-m", "clue_jax.main", "--help"], cwd=elsewhere, env=_env(str(target)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert all(f"  {n} " in out.stdout for n in _checkout_configs())
    code = ("from clue_jax import configs; print(configs.path('quickstart')); "
            "print(configs.get_config('replicate_bios', 'tiny').pipeline)")
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=_env(str(target)), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    path, pipeline = out.stdout.split()
    assert path.startswith(str(target)) and pipeline == "replicate"


def test_docs_show_the_help_as_printed():
    """docs/cli.md's copy of --help is the real output (regenerate it when a flag or a config changes)."""
    page = open(os.path.join(ROOT, "docs", "cli.md")).read()
    text = cli_help.help_text(main).rstrip("\n")
    assert f"```\n{text}\n```" in page
