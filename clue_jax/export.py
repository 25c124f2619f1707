"""Weights back out: the trained model of a finished stage as a Hugging Face directory.

    python -m clue_jax.export --workdir W --stage STAGE --out DIR [--max_shard_size 5GB] [--dtype bfloat16]
                              [--verbose]

DIR gets config.json, safetensors shards (model-0000k-of-0000n.safetensors
+ model.safetensors.index.json once the model passes --max_shard_size, else
one model.safetensors) and the run's tokenizer, so
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads the student
and `AutoTokenizer.from_pretrained(DIR)(prompt)` gives the ids training fed
it: <bos>, then the text (the tokenizer's post-processor carries that rule).
Tensors are written in the stage's parameter dtype (float32 for a stage
trained with train.precision='mixed') unless --dtype casts them (e.g.
bfloat16, half the bytes). LoRA students are exported merged: their stage saved W + (alpha / r) A B
(clue_jax.models.lora.merge_lora), so the export is an ordinary checkpoint.

At scale: run it on every host like training (same launcher, JAX
distributed). The model is loaded sharded over all devices (fsdp), and
`hf.save` gathers one tensor at a time, which process 0 appends to the current
shard file and releases; no host holds the whole model. Files are written to
a temporary directory (.DIR.tmp-*, beside DIR) and renamed (local DIR) or
uploaded (a URL such as gs://bucket/dir) only when complete. Bad input -- an
unknown stage (the finished ones are listed), a stage without done.json, a
non-empty DIR, an unreachable URL -- is one line and exit code 2, with nothing
saved touched. A failure while writing (a full disk, say) is one line too
(exit 2 for the environment, 1 otherwise; --verbose adds the traceback), and
SIGTERM or Ctrl-C stop it with one line (exit 143 / 130); either way the
temporary directory is removed. One left by a kill -9 is removed by the next
export beside it (each export holds a lock on its own while it writes).
Quiet by default: only errors and the final line; --verbose shows the log.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile

import jax

from clue_jax import workdir_fs as paths  # the one path layer (local or gs://, s3://, az://)
from clue_jax.errors import UserInputError
from clue_jax.pipelines.stages import Stages

log = logging.getLogger("clue_jax")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' (powers of 10, as transformers' max_shard_size), '500MiB' or a byte count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if m is None or float(m.group(1)) <= 0:
        raise UserInputError(f"--max_shard_size={text!r}: expected a size such as 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def _resolve(workdir: str, path: str) -> str:
    """Stage records may hold paths relative to the workdir (portable runs) or absolute ones."""
    return path if paths.is_remote(path) or os.path.isabs(path) else paths.join(workdir, path)


def _done(stages: Stages, name: str) -> dict | None:
    """A stage's done.json, or None while it has none (never run, crashed or preempted)."""
    file = paths.join(stages.path(name), "done.json")
    if not paths.exists(file):
        return None
    try:
        return json.loads(paths.read_text(file))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserInputError(f"{file}: unreadable stage record ({' '.join(str(err).split())})") from None


def _finished_with_model(stages: Stages, names: list[str]) -> list[str]:
    out = []
    for name in names:
        done = _done(stages, name)
        if done is not None and isinstance(done.get("result"), dict) and done["result"].get("model_dir"):
            out.append(name)
    return out


def find_model(workdir: str, stage: str) -> tuple[str, str]:
    """(model directory, tokenizer directory) of a finished stage; bad input is one UserInputError."""
    stages = Stages(workdir)
    names = [n for n in paths.listdir(stages.root) if not n.endswith(".previous")]
    if not names:
        raise UserInputError(f"--workdir {workdir}: no stages there ({stages.root} is missing or empty)")
    with_model = _finished_with_model(stages, names)
    if stage not in names:
        raise UserInputError(f"--stage {stage!r}: no such stage in {stages.root}; "
                             f"finished stages with a model: {', '.join(with_model) or 'none'}")
    done = _done(stages, stage)
    if done is None:
        raise UserInputError(f"--stage {stage}: did not finish (no done.json in {stages.path(stage)}); "
                             "rerun the training command to complete it")
    if stage not in with_model:
        raise UserInputError(f"--stage {stage}: holds no trained model (finished stages with a model: "
                             f"{', '.join(with_model) or 'none'})")
    model_dir = _resolve(workdir, done["result"]["model_dir"])
    if not paths.exists(paths.join(model_dir, "model_config.json")):
        kind = "an ELECTRA pair (MCL), which has no causal-LM export" if paths.exists(
            paths.join(model_dir, "pair_config.json")) else "no model_config.json"
        raise UserInputError(f"--stage {stage}: {model_dir} holds {kind}")
    tok = _done(stages, "tokenizer")
    if tok is None or not (tok.get("result") or {}).get("path"):
        raise UserInputError(f"--workdir {workdir}: no finished tokenizer stage ({stages.path('tokenizer')})")
    return model_dir, _resolve(workdir, tok["result"]["path"])


def check_out(out: str) -> None:
    """Refuses an existing non-empty --out (never overwrite); an unreachable URL fails here, before any work."""
    if paths.is_remote(out):
        if paths.listdir(out):
            raise UserInputError(f"--out {out} exists and is not empty; refusing to overwrite it")
        return
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserInputError(f"--out {out} exists and is not empty; refusing to overwrite it")
    if not os.path.isdir(os.path.dirname(out)):
        raise UserInputError(f"--out {out}: parent directory {os.path.dirname(out)} does not exist")


def _agree(check) -> None:
    """Runs `check` on process 0 and makes every process raise its error, so none waits alone in a gather."""
    if jax.process_count() == 1:
        return check()
    import numpy as np
    from jax.experimental import multihost_utils

    message = ""
    if jax.process_index() == 0:
        try:
            check()
        except UserInputError as err:
            message = str(err)
    raw = np.frombuffer(message.encode()[:1024].ljust(1024, b"\0"), np.uint8)
    message = bytes(multihost_utils.broadcast_one_to_all(raw)).rstrip(b"\0").decode(errors="replace")
    if message:
        raise UserInputError(message)


def export(workdir: str, stage: str, out: str, max_shard_bytes: int | None = 5 * 10**9,
           dtype: str | None = None) -> str:
    """Writes the stage's model as an HF directory at `out` (a local path or a URL); returns `out`.

    dtype: the tensors' dtype (None: the parameters' own)."""
    from clue_jax.clues import scoring
    from clue_jax.data.tokenizer import bos_first, save_bos_first
    from clue_jax.models import factory, hf, lora
    from clue_jax.parallel import mesh as mesh_lib

    workdir, out = paths.absolute(workdir), paths.absolute(out).rstrip("/")
    model_dir, tok_dir = find_model(workdir, stage)
    _agree(lambda: check_out(out))
    tokenizer = hf.load_tokenizer(tok_dir)
    bos_first(tokenizer)  # a tokenizer that cannot take training's BOS rule is refused before any weight is written
    mesh = mesh_lib.make_mesh((1, -1, 1))  # fsdp over every device: each holds a slice of the model
    model, cfg = factory.load_params(model_dir, mesh)
    if lora.has_lora(model):
        lora.merge_lora(model)
    if dtype:
        model, cfg = scoring.in_dtype(model, dtype), dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
    extra = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
             if getattr(tokenizer, k, None) is not None}

    writer = jax.process_index() == 0
    tmp, held = _temp_dir(out) if writer else (tempfile.mkdtemp(prefix="clue_jax_export_"), None)  # others: unused
    try:
        hf.save(model, cfg, tmp, max_shard_bytes=max_shard_bytes, extra_config=extra)
        if writer:
            save_bos_first(tokenizer, tmp)
            if paths.is_remote(out):
                paths.upload_dir(tmp, out)
            else:
                if os.path.isdir(out):
                    os.rmdir(out)  # empty (check_out): replaced by the complete directory
                os.replace(tmp, out)
    finally:  # gone after a rename; else (an upload, an error, a signal) removed, as every process's own temporary
        shutil.rmtree(tmp, ignore_errors=True)
        if held is not None:
            os.close(held)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("export:done")
    log.info("stage %s exported to %s", stage, out)
    return out


def _temp_dir(out: str) -> tuple[str, int | None]:
    """A new temporary directory for `out` and the fd of its lock (None where the filesystem has no directory locks).

    Earlier temporaries of the same name pattern whose lock nobody holds were
    left by a killed export (kill -9 runs no cleanup) and are removed first;
    one still locked belongs to a live export and is left alone.
    """
    if paths.is_remote(out):
        parent, prefix = tempfile.gettempdir(), "clue_jax_export_"
    else:
        parent, prefix = os.path.dirname(out), f".{os.path.basename(out)}.tmp-"
    for name in os.listdir(parent):
        if name.startswith(prefix) and os.path.isdir(os.path.join(parent, name)):
            fd = _try_lock(os.path.join(parent, name))
            if fd is not None:
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
                os.close(fd)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    return tmp, _try_lock(tmp)


def _try_lock(directory: str) -> int | None:
    """An fd holding an exclusive flock on `directory`, or None when it is held elsewhere or cannot be locked."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


class Stopped(Exception):
    """SIGTERM (or SIGINT) during an export: raised where the export is, so its cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the cleanup short
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Stopped(signum)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (through run), like every other bad input
        raise UserInputError(f"{message} (usage: python -m clue_jax.export --workdir W --stage STAGE --out DIR)")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m clue_jax.export", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="the run's --workdir (local or a URL)")
    parser.add_argument("--stage", required=True, help="a finished stage with a model, e.g. cpt_small_plain_s0")
    parser.add_argument("--out", required=True, help="new or empty directory (local or a URL) for the HF model")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument("--dtype", default="", choices=("", "float32", "bfloat16", "float16"),
                        help="tensor dtype of the export (default: the parameters' dtype)")
    parser.add_argument("--verbose", action="store_true", help="show the log (orbax, JAX) and tracebacks")
    args = parser.parse_args(argv)  # --verbose acts in run(), before anything logs
    from clue_jax import distributed

    distributed.maybe_initialize()
    out = export(args.workdir, args.stage, args.out, parse_size(args.max_shard_size), args.dtype or None)
    print(f"exported stage {args.stage} to {out}")
    return 0


_ENVIRONMENT = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)  # the machine's state, not the code


def _describe(err: Exception) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}{': ' + str(err.filename) if err.filename else ''}"
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def run() -> None:
    """Console entry point: one line and a non-zero exit for whatever stops the export, its temporary removed."""
    verbose = "--verbose" in sys.argv[1:]
    level = logging.INFO if verbose else logging.WARNING  # loading a checkpoint logs a screenful of orbax INFO lines
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr,
                        force=True)  # orbax logs at import, which gives the root a default handler first
    for name in ("absl", "clue_jax"):
        logging.getLogger(name).setLevel(level)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    signal.signal(signal.SIGTERM, _raise_stopped)
    signal.signal(signal.SIGINT, _raise_stopped)
    try:
        code = main(sys.argv[1:])
    except UserInputError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        code = 2
    except Stopped as stop:
        print(f"error: export stopped by {stop}; its temporary files were removed", file=sys.stderr)
        code = 128 + stop.signum
    except Exception as err:  # a full disk, a lost bucket, a bug: one line (the traceback with --verbose)
        if verbose:
            raise
        print(f"error: export failed ({_describe(err)}); its temporary files were removed (--verbose shows the "
              "traceback)", file=sys.stderr)
        code = 2 if isinstance(err, OSError) and err.errno in _ENVIRONMENT else 1
    sys.exit(code)


if __name__ == "__main__":
    run()
