"""CLI: `python -m clue_jax.main --config configs/<name>.py[:variant] --workdir DIR [--config.key=value]`.

Parses flags, checks the workdir, writes config.json and hands the config to
the pipeline it names. Bad input of any kind ends in one line on stderr and
exit code 2.
"""
from __future__ import annotations

import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

from clue_jax import cli_help, config_check, configs
from clue_jax.errors import UserInputError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, optionally file.py:variant.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summaries (resumed if present).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "jax.distributed.initialize(): auto = when a cluster environment (TPU pod, SLURM, coordinator env) is detected.",
)


def main(argv: list[str]) -> int:
    if _print_help(argv):
        return 0
    argv = configs.resolve_argv(argv)  # --config NAME: a shipped config
    try:
        flags.FLAGS(argv)
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as err:  # ml_collections raises these
        raise UserInputError(config_check.explain_flag_error(err, argv)) from None
    if _CONFIG.value is None or not _WORKDIR.value:
        raise UserInputError("usage: python -m clue_jax.main --config configs/<name>.py[:variant] --workdir DIR")
    from clue_jax.pipelines.validate import check_config  # types, ranges, choices: before anything runs

    check_config(_CONFIG.value)
    from clue_jax import distributed, pipelines  # heavy imports after the flags are known to be good

    distributed.maybe_initialize(_DISTRIBUTED.value)
    workdir = config_check.prepare_workdir(_WORKDIR.value)
    config = _CONFIG.value
    config_check.write_config(config, workdir)
    pipelines.run(config, workdir)
    return 0


def _print_help(argv: list[str]) -> bool:
    """-h / --help: print the flags, the shipped configs and an example (absl's own --help needs app.run)."""
    if not cli_help.wants_help(argv):
        return False
    print(cli_help.help_text(sys.modules[__name__]))
    return True


def run() -> None:
    """Console entry point (`clue-jax`): one-line errors, exit 2 on bad input."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        code = main(sys.argv)
    except UserInputError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    run()
