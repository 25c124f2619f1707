"""No code in clue_jax/data that only tests call: the pipelines write the world as jsonl
themselves, so the tfds builder of the world, `load_tfds_text` and the host-sharding helpers went."""
import ast
import glob
import importlib.util
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sources() -> dict[str, str]:
    return {f: open(f).read() for f in glob.glob(os.path.join(ROOT, "clue_jax", "**", "*.py"), recursive=True)}


def test_every_public_function_of_the_data_package_has_a_caller_in_the_package():
    sources = _sources()
    unused = []
    for path in sorted(glob.glob(os.path.join(ROOT, "clue_jax", "data", "*.py"))):
        for node in ast.parse(sources[path]).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                word = re.compile(rf"\b{node.name}\b")
                own = len(word.findall(sources[path])) > 1  # used in its own module beyond the definition
                if not own and not any(word.search(text) for p, text in sources.items() if p != path):
                    unused.append(f"{os.path.relpath(path, ROOT)}:{node.name}")
    assert unused == []


def test_the_removed_helpers_stay_removed():
    from clue_jax.data import corpus

    assert importlib.util.find_spec("clue_jax.data.tfds_bios") is None
    assert not {"load_tfds_text", "host_shard", "tfds_split_for_process"} & set(dir(corpus))
