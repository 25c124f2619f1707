"""Weights back out: the trained model of a finished stage as a Hugging Face directory.

    python -m clue_jax.export --workdir W --stage STAGE --out DIR [--max_shard_size 5GB] [--dtype bfloat16]

DIR gets config.json, safetensors shards (model-0000k-of-0000n.safetensors
+ model.safetensors.index.json once the model passes --max_shard_size, else
one model.safetensors) and the run's tokenizer, so
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads the student.
Tensors are written in the stage's parameter dtype (float32 for a stage
trained with train.precision='mixed') unless --dtype casts them (e.g.
bfloat16, half the bytes). LoRA students are exported merged: their stage saved W + (alpha / r) A B
(clue_jax.models.lora.merge_lora), so the export is an ordinary checkpoint.

At scale: run it on every host like training (same launcher, JAX
distributed). The model is loaded sharded over all devices (fsdp), and
`hf.save` gathers one tensor at a time, which process 0 appends to the current
shard file and releases; no host holds the whole model. Files are written to
a temporary directory and renamed (local DIR) or uploaded (a URL such as
gs://bucket/dir) only when complete. Bad input -- an unknown stage (the
finished ones are listed), a stage without done.json, a non-empty DIR, an
unreachable URL -- is one line and exit code 2, with nothing saved touched.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid

import jax

from clue_jax import paths
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
    from clue_jax.models import factory, hf, lora
    from clue_jax.parallel import mesh as mesh_lib

    workdir, out = paths.absolute(workdir), paths.absolute(out).rstrip("/")
    model_dir, tok_dir = find_model(workdir, stage)
    _agree(lambda: check_out(out))
    tokenizer = hf.load_tokenizer(tok_dir)
    mesh = mesh_lib.make_mesh((1, -1, 1))  # fsdp over every device: each holds a slice of the model
    model, cfg = factory.load_params(model_dir, mesh)
    if lora.has_lora(model):
        lora.merge_lora(model)
    if dtype:
        model, cfg = scoring.in_dtype(model, dtype), dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
    extra = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
             if getattr(tokenizer, k, None) is not None}

    writer = jax.process_index() == 0
    if paths.is_remote(out):
        tmp = tempfile.mkdtemp(prefix="clue_jax_export_")
    else:
        tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        hf.save(model, cfg, tmp, max_shard_bytes=max_shard_bytes, extra_config=extra)
        if writer:
            tokenizer.save_pretrained(tmp)
            if paths.is_remote(out):
                paths.upload_dir(tmp, out)
            else:
                if os.path.isdir(out):
                    os.rmdir(out)  # empty (check_out): replaced by the complete directory
                os.replace(tmp, out)
    finally:  # gone after a rename; else (an upload, an error) removed, as every process's own temporary
        shutil.rmtree(tmp, ignore_errors=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("export:done")
    log.info("stage %s exported to %s", stage, out)
    return out


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
    args = parser.parse_args(argv)
    from clue_jax import distributed

    distributed.maybe_initialize()
    out = export(args.workdir, args.stage, args.out, parse_size(args.max_shard_size), args.dtype or None)
    print(f"exported stage {args.stage} to {out}")
    return 0


def run() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        code = main(sys.argv[1:])
    except UserInputError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    run()
