"""The package's data flows one way, and its modules stay small.

Layers, lowest first, from the flow config -> data -> models -> clues/objectives -> train -> eval/report ->
pipelines -> CLI: a module may import its own layer or a lower one, never a higher one (models, data and
clues never import the trainer, a pipeline or report code). Every import is read from the source with ast,
imports inside functions included.
"""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "clue_jax")
MAX_LINES = 450

# name (a package, or a module where it differs from its package) -> layer
LAYERS = {
    # infrastructure every layer may use: errors, strict settings, paths and buckets, the config and workdir
    # checks, the run lock, multi-host start-up, meshes and sharding rules, the named choices of the configs, the
    # metrics trackers and the run's identity
    "clue_jax.errors": 0, "clue_jax.dataclass_config": 0, "clue_jax.workdir_fs": 0, "clue_jax.config_check": 0,
    "clue_jax.run_lock": 0, "clue_jax.distributed": 0, "clue_jax.parallel": 0, "clue_jax.choices": 0,
    "clue_jax.trackers": 0, "clue_jax.run_identity": 0,
    "clue_jax.data": 1, "clue_jax.models": 1,
    "clue_jax.clues": 2, "clue_jax.eval": 2,
    "clue_jax.train": 3, "clue_jax.eval.tables": 3,  # report code: tables of results
    "clue_jax.extraction": 4, "clue_jax.mcl": 4,
    "clue_jax.pipelines": 5,
    "clue_jax": 6, "clue_jax.main": 6, "clue_jax.export": 6, "clue_jax.cli_help": 6, "clue_jax.configs": 6,
}


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True):
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[name.removesuffix(".__init__")] = path
    return out


def layer(name: str) -> int | None:
    """The layer of the longest LAYERS entry that is `name` or a package above it."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    return None


def imports(name: str, path: str) -> list[tuple[int, str]]:
    """(line, imported clue_jax name) for every import in a module; `from a import b` names a.b (b may be a
    module), relative imports resolved against the module's package."""
    is_package = path.endswith("__init__.py")
    out = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return [(line, target) for line, target in out if target == "clue_jax" or target.startswith("clue_jax.")]


def upward_imports() -> list[str]:
    found = []
    for name, path in sorted(_modules().items()):
        own = layer(name)
        for line, target in imports(name, path):
            if layer(target) > own:
                found.append(f"{os.path.relpath(path, ROOT)}:{line} ({name}, layer {own}) imports {target} "
                             f"(layer {layer(target)})")
    return found


def test_every_module_has_a_layer():
    assert [name for name in _modules() if layer(name) is None] == []


def test_no_module_imports_a_higher_layer():
    assert upward_imports() == []


def test_the_checker_sees_an_upward_import(tmp_path):
    """The parser finds upward imports in each form: plain, from-import of a module or a name, relative."""
    source = ("import clue_jax.train.loop\nfrom clue_jax.pipelines import common\n"
              "from clue_jax.eval.tables import format_table\nfrom ..train import loop\n"
              "def f():\n    from clue_jax.mcl.report import claims\n")
    path = tmp_path / "probe.py"
    path.write_text(source)
    found = [target for _, target in imports("clue_jax.models.probe", str(path))]
    assert found == ["clue_jax.train.loop", "clue_jax.pipelines.common", "clue_jax.eval.tables.format_table",
                     "clue_jax.train.loop", "clue_jax.mcl.report.claims"]
    assert all(layer(t) > layer("clue_jax.models.probe") for t in found)
    assert layer("clue_jax.eval.tables.format_table") == 3 and layer("clue_jax.eval.metrics") == 2


def test_no_module_is_over_450_lines():
    long = {os.path.relpath(path, ROOT): n for path in _modules().values()
            if (n := sum(1 for _ in open(path))) > MAX_LINES}
    assert long == {}
