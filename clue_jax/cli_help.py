"""`--help` / `-h` for the CLI: the flags, every shipped config with its variants and pipeline, an example.

The flags come from absl (their help strings in main.py) and the configs from `clue_jax.configs`
(docstrings and VARIANTS), so neither list is written twice.
"""
from __future__ import annotations

import re
import textwrap

from absl import flags

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")
EXAMPLE = "python -m clue_jax.main --config configs/quickstart.py:tiny --workdir runs/qs_tiny"


def wants_help(argv: list[str]) -> bool:
    return any(arg in HELP_FLAGS for arg in argv[1:])


def _flag_lines(module) -> list[tuple[str, str]]:
    rows = []
    for flag in sorted(flags.FLAGS.get_flags_for_module(module), key=lambda f: f.name != "config"):
        if flag.name == "config":
            rows.append(("--config CONFIG[:VARIANT]",
                         f"{flag.help} CONFIG is a file (configs/quickstart.py) or a shipped config's name "
                         "(quickstart)."))
            rows.append(("--config.KEY=VALUE", "Override one config key, e.g. --config.cpt.lr=5e-4 "
                         "--config.clues.arms='(\"plain\",\"contrast\")' (tuples in Python syntax)."))
            continue
        choices = getattr(flag.parser, "enum_values", None)
        switch = isinstance(flag, flags.BooleanFlag)  # given or not: no value, no default to show
        name = (f"--{flag.name}" if switch else
                f"--{flag.name} {{{','.join(choices)}}}" if choices else f"--{flag.name} {flag.name.upper()}")
        default = f" Default: {flag.default}." if flag.default not in (None, "") and not switch else ""
        rows.append((name, re.sub(r"^<[^>]*>: ", "", flag.help) + default))  # absl prefixes enums' choices
    rows.append(("-h, --help", "Print this help and exit."))
    return rows


def _table(rows: list[tuple[str, str]], indent: int = 2, width: int = 100) -> list[str]:
    left = max(len(a) for a, _ in rows) + 2
    lines = []
    for a, b in rows:
        wrapped = textwrap.wrap(b, width - indent - left) or [""]
        lines.append(" " * indent + a.ljust(left) + wrapped[0])
        lines += [" " * (indent + left) + w for w in wrapped[1:]]
    return lines


def help_text(module) -> str:
    """The help of the CLI whose flags `module` (clue_jax.main) defines."""
    from clue_jax import configs

    lines = ["usage: python -m clue_jax.main --config CONFIG[:VARIANT] --workdir DIR [--config.KEY=VALUE ...]",
             "       (installed: clue-jax --config CONFIG[:VARIANT] --workdir DIR ...)", "",
             "Runs the pipeline the config names in DIR; rerunning the same command resumes it.", "",
             "flags:"]
    lines += _table(_flag_lines(module))
    lines += ["", "configs (configs/NAME.py in a checkout, or --config NAME; NAME:VARIANT picks a variant):"]
    rows = []
    for c in configs.catalogue():
        variants = ", ".join(f":{v}" if v else "(default)" for v in c.variants)
        rows.append((c.name, f"pipeline {c.pipeline}; variants {variants}. {c.summary}"))
    lines += _table(rows)
    lines += ["", "  :tiny variants take a minute or two on a CPU, mostly compiling (smoke tests: numbers mean nothing).",
              "", "example:", f"  {EXAMPLE}", ""]
    return "\n".join(lines)
