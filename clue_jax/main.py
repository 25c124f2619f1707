"""CLI: `python -m clue_jax.main --config configs/<name>.py[:variant] --workdir DIR [--config.key=value]`.

Parses flags (each given once), loads the config, checks its values and the
user's files before the workdir is touched, locks the workdir (one run at a
time), writes the config to config.running.json and hands it to the pipeline it names;
config.json is replaced only when the run succeeds. Bad input, a read-only or
full disk end in one line on stderr and exit code 2; Ctrl-C saves a checkpoint
like SIGTERM and exits 130.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
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
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the resolved config (after --config.* overrides and validation) as JSON and exit; "
    "no --workdir needed, nothing is written.")


def main(argv: list[str]) -> int:
    if _print_help(argv):
        return 0
    argv = configs.resolve_argv(argv)  # --config NAME: a shipped config
    given = config_check.given_flags(argv)  # a flag given twice is refused, whatever its type
    try:
        flags.FLAGS(argv)
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as err:  # ml_collections raises these
        raise UserInputError(config_check.explain_flag_error(err, argv)) from None
    config = _load_config(argv)  # before anything in the workdir is touched
    if config is None or not (_WORKDIR.value or _PRINT_CONFIG.value):
        raise UserInputError("usage: python -m clue_jax.main --config configs/<name>.py[:variant] --workdir DIR")
    from clue_jax.pipelines.validate import check_config, check_files  # before anything runs or is written

    check_config(config, [name[len("config."):] for name in given if name.startswith("config.")])
    if _PRINT_CONFIG.value:
        print(config.to_json_best_effort(indent=2, sort_keys=True))
        return 0
    check_files(config)  # the user's corpus and QA file: a bad line leaves no workdir, lock or running config
    from clue_jax import distributed, pipelines, run_lock  # heavy imports after the flags are known to be good

    distributed.maybe_initialize(_DISTRIBUTED.value)
    workdir = config_check.prepare_workdir(_WORKDIR.value)
    import jax

    if jax.process_index() == 0:
        run_lock.acquire(workdir)
    try:
        with _ctrl_c_stops_training() as interrupted:
            try:
                pipelines.run(config, workdir)
            except SystemExit:  # a stage stopped at a checkpoint (SIGTERM, or Ctrl-C below)
                if interrupted:
                    raise KeyboardInterrupt from None
                raise
    finally:
        run_lock.release(workdir)
    return 0


def _print_help(argv: list[str]) -> bool:
    """-h / --help: print the flags, the shipped configs and an example (absl's own --help needs app.run)."""
    if not cli_help.wants_help(argv):
        return False
    print(cli_help.help_text(sys.modules[__name__]))
    return True


def _load_config(argv: list[str]):
    """The --config file: a file that fails to load ends here, as one line, before the workdir is touched."""
    try:
        config = _CONFIG.value
        if config is not None:
            config.keys()  # ml_collections hands out a stand-in that raises its load error on first use
        return config
    except OSError as err:
        lines = [l.strip() for l in str(err).splitlines() if l.strip()]
        spec = config_check.config_spec(argv) or ""
        raise UserInputError(configs.missing_file_hint(spec.split(":", 1)[0])
                             or f"cannot load --config: {lines[-1] if lines else err}") from None


@contextlib.contextmanager
def _ctrl_c_stops_training():
    """Ctrl-C while a Trainer runs takes its SIGTERM path (checkpoint at the next step, then stop);
    elsewhere, or pressed twice, it interrupts at once. Yields a list that is non-empty once pressed."""
    pressed: list[bool] = []

    def handle(signum, frame):
        graceful = signal.getsignal(signal.SIGTERM)
        pressed.append(True)
        if len(pressed) == 1 and callable(graceful):  # a Trainer's preemption handler is installed
            graceful(signum, frame)
        else:
            raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, handle)
    except ValueError:  # not the main thread
        yield pressed
        return
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def run() -> None:
    """Console entry point (`clue-jax`): one-line errors, exit 2 on bad input, 130 on Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        code = main(sys.argv)
    except UserInputError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        code = 2
    except OSError as err:  # read-only or full disk, permissions: the environment, not the code
        print(f"error: {_describe_os_error(err)}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); checkpoints and finished stages are kept, rerun the same command "
              "to resume", file=sys.stderr)
        code = 130
    sys.exit(code)


def _describe_os_error(err: OSError) -> str:
    where = f": {err.filename}" if err.filename else ""
    what = err.strerror or " ".join(str(err).split())
    hint = {errno.ENOSPC: "free some space", errno.EROFS: "use a writable --workdir",
            errno.EACCES: "use a writable --workdir", errno.EDQUOT: "free some space"}.get(err.errno)
    return f"{what}{where}" + (f"; {hint} and rerun the same command (finished stages and checkpoints are kept)"
                               if hint else "")


if __name__ == "__main__":
    run()
