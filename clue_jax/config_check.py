"""Config and workdir checks for the CLI: say what is wrong and what would be right."""
from __future__ import annotations

import difflib
import json
import re

from typing import Any

import ml_collections
from etils import epath

from clue_jax import workdir_fs
from clue_jax.errors import UserInputError


def flat_items(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf, the form every check and hint speaks in."""
    out = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.extend(flat_items(value, name + "."))
        else:
            out.append((name, value))
    return out


def all_keys(config: ml_collections.ConfigDict) -> list[str]:
    return [key for key, _ in flat_items(config)]


def given_flags(argv: list[str]) -> list[str]:
    """The flag names on the command line (`config.cpt.lr`, `workdir`), each once; a flag given twice is
    refused for every flag alike. absl keeps a scalar's last value, while ml_collections joins a tuple's values
    (`--config.seeds=0 --config.seeds=1` is (0, 1)), so neither rule would hold for all; refusing
    is the one that never drops a value the user wrote."""
    names: list[str] = []
    for arg in argv[1:]:
        if arg == "--":
            break
        if not arg.startswith("-"):
            continue
        name = arg.lstrip("-").split("=", 1)[0]
        if name.startswith("noconfig."):  # --noconfig.eval.cloze: the boolean form of --config.eval.cloze
            name = name[2:]
        if not name[:1].isalpha():  # a negative number given as a value, not a flag
            continue
        if name in names:
            value = arg.split("=", 1)[1] if "=" in arg else ""
            hint = f' (a tuple is one value: --{name}="(a,b)")' if value.lstrip()[:1] in "([" and value else ""
            raise UserInputError(f"--{name} is given twice: give each flag once{hint}")
        names.append(name)
    return names


def _load_config_for_hint(argv: list[str]):
    from ml_collections.config_flags import config_flags as cf

    for i, arg in enumerate(argv):
        value = None
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        if value:
            try:
                return cf._LoadConfigModule("config", value.split(":")[0]).get_config(
                    *(value.split(":", 1)[1:] or [])
                )
            except Exception:
                return None
    return None


_TYPE_NAMES = {bool: "True or False", int: "an integer", float: "a number", str: "a string",
               tuple: "a tuple, e.g. \"('a','b')\"", list: "a list"}


def config_spec(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _explain_config_file_error(text: str, spec: str) -> str:
    """A config file that failed to load: its last exception line, not ml_collections' flattened traceback."""
    last = [line.strip() for line in text.splitlines() if line.strip()][-1]
    variant = re.search(r"unknown variant '([^']*)' for (\S+) \(have: ([^)]*)\)", last)
    if variant:
        name, path, have = variant.groups()
        return f"unknown variant {name!r} for {path} (--config {spec}); valid variants: {have}"
    return f"cannot load --config {spec}: {last}"


def _explain_value_error(key: str, value: str, config) -> str:
    """A key that exists but whose value does not parse as the key's type."""
    current = config
    for part in key.split("."):
        current = current[part]
    expected = _TYPE_NAMES.get(type(current), type(current).__name__)
    return f"--config.{key}={value}: config key {key!r} expects {expected} (now {current!r})"


def explain_flag_error(err: Exception, argv: list[str]) -> str:
    """Turns an absl/ml_collections flag error into one line: a bad value, an unknown key with the nearest
    valid keys, or a config file / variant that does not load."""
    raw = str(err)
    text = " ".join(raw.split())
    spec = config_spec(argv)
    if "Error whilst parsing config file" in raw or (spec and f"--config={spec}:" in text):
        return _explain_config_file_error(raw, spec or "")
    match = re.search(r"--config\.([\w.]+)", text) or re.search(r"[Kk]ey '?([\w.]+)'? does not exist", text)
    bad = None
    for arg in argv:
        if arg.startswith("--config."):
            key = arg[len("--config."):].split("=", 1)[0]
            if match and key.endswith(match.group(1).split(".")[-1]):
                bad = key
    config = _load_config_for_hint(argv)
    keys = set(all_keys(config)) if config is not None else set()
    if bad is not None and bad in keys:  # the key exists: its value is what failed
        value = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--config.{bad}=")), "(no value)")
        return _explain_value_error(bad, value, config)
    if config is not None and bad is None:
        for arg in argv:
            if arg.startswith("--config."):
                key = arg[len("--config."):].split("=", 1)[0]
                if key not in keys:
                    bad = key
    if config is not None and bad is not None:
        keys = all_keys(config)
        near = difflib.get_close_matches(bad, keys, n=5, cutoff=0.4)
        section = bad.rsplit(".", 1)[0] + "." if "." in bad else ""
        siblings = [k for k in keys if k.startswith(section)] if section else []
        hint = near or siblings[:12] or keys[:12]
        return f"unknown config key '{bad}'; valid keys near it: {', '.join(hint)}"
    return f"bad command line: {text}"


def workdir_path(path: str) -> epath.Path:
    """An absolute local path, or a cloud path (gs://...) as given (see workdir_fs.path)."""
    return workdir_fs.path(path)


def prepare_workdir(workdir: str) -> str:
    path = workdir_path(workdir)
    if "://" not in str(workdir):
        if not path.parent.is_dir():
            raise UserInputError(f"the parent of --workdir does not exist: {path.parent}")
        if path.exists() and not path.is_dir():
            raise UserInputError(f"--workdir is a file, not a directory: {path}")
    with workdir_fs.errors(path, "reach"):  # an unreachable bucket: one line naming it
        path.mkdir(parents=True, exist_ok=True)
    return str(path)


def write_config(config: ml_collections.ConfigDict, workdir: str, run: dict | None = None) -> None:
    """Writes the run's resolved config to config.running.json (atomically, process 0), with `run`
    (its id, commit and versions) under the key "run".

    config.json is only replaced by `finish_config` once the run succeeded, so
    it always describes the run that wrote summary.json.
    """
    import jax

    if jax.process_index() != 0:
        return
    resolved = json.loads(config.to_json_best_effort())
    workdir_fs.write_text(workdir_path(workdir) / _RUNNING,
                          json.dumps({**resolved, **({"run": run} if run else {})}, indent=2, sort_keys=True))


def finish_config(workdir: str) -> None:
    """After a successful run: config.running.json becomes config.json; a different
    earlier config.json is kept as config.previous-<n>.json (n = 1, 2, ...)."""
    import jax

    root = workdir_path(workdir)
    running, final = root / _RUNNING, root / "config.json"
    if jax.process_index() != 0 or not running.exists():
        return
    if final.exists() and workdir_fs.read_text(final) != workdir_fs.read_text(running):
        taken = [int(m.group(1)) for p in root.glob("config.previous-*.json")
                 if (m := re.fullmatch(r"config\.previous-(\d+)\.json", p.name))]
        workdir_fs.rename(final, root / f"config.previous-{max(taken, default=0) + 1}.json")
    workdir_fs.replace(running, final)


_RUNNING = "config.running.json"


def discard_running_config(workdir: str) -> None:
    """A run refused as bad input leaves no config.running.json: that file names the run in progress, and
    the refused config never trained (finished stages keep their own records)."""
    import jax

    running = workdir_path(workdir) / _RUNNING
    if jax.process_index() == 0 and workdir_fs.exists(running):
        with workdir_fs.errors(running, "remove"):
            running.unlink()


def read_json(path: str, what: str) -> dict:
    try:
        return json.loads(epath.Path(path).read_text())
    except FileNotFoundError:
        raise UserInputError(f"{what} not found: {path}") from None
    except (OSError, ValueError) as err:  # ValueError: bad JSON or not UTF-8
        raise UserInputError(f"{what} is unreadable: {path} ({' '.join(str(err).split())})") from None
