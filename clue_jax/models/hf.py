"""Hugging Face checkpoints <-> clue_jax CausalLM (GPT-2, LLaMA incl. LLaMA-3, Gemma-2).

Loading never materialises the model with real (or random) weights first: the
model is built abstractly (`nnx.eval_shape`), each parameter's target sharding
comes from `clue_jax.parallel.rules.state_shardings`, and every parameter is
created with `jax.make_array_from_callback`, whose callback reads from the
memory-mapped safetensors file only the slice one device needs
(`safe_open(...).get_slice`). So no device ever holds more of a tensor than its
own shard, which is what lets a 70B model load onto a pod. What a host reads:
each distinct slice its own devices need, once (slices replicated over several
local devices are shared); a parameter that is replicated everywhere is read
whole, once per host. The layers are stacked (clue_jax.models.stacking): a
stacked param [L, ...] is filled from the L per-layer HF tensors, so host
memory peaks at about one stacked param's local slices (L tensors' worth).
torch is not needed: safetensors' numpy backend reads bf16 as ml_dtypes.bfloat16.

HF names map to NNX paths through a small table of templates (the bonsai
style); the same table drives `save`, so the two directions cannot drift.
`save` streams: each HF tensor (one layer's slice of a stacked param) in turn
is gathered, appended to its shard file and dropped, so a host holds about
one tensor, never the model. A checkpoint at a URL (gs://...) is never
copied: each slice is a ranged read of the remote file (clue_jax.models.safetensors_io),
so a host reads only the rows of the tensors its own devices hold.

The name table lives in clue_jax.models.hf_keys, config.json in
clue_jax.models.hf_config, the safetensors format in
clue_jax.models.safetensors_io.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clue_jax import workdir_fs as paths  # the one path layer (local or gs://, s3://, az://)
from clue_jax.errors import UserInputError
from clue_jax.models.causal_lm import CausalLM
from clue_jax.models.config import ModelConfig
from clue_jax.models.hf_config import config_from_hf, config_to_hf
from clue_jax.models.hf_keys import (_IGNORED, SPLIT, TRANSPOSE, _hf_key, _hf_layout, _hf_name, _hf_tensors, _layer,
                                     _path_str, _per_layer, _Rule, key_rules)
from clue_jax.models.safetensors_io import (INDEX_FILE, SINGLE_FILE, SafetensorsStream, open_file, plan_shards,
                                            read_config, to_host, weight_files)

__all__ = ["INDEX_FILE", "SINGLE_FILE", "config_from_hf", "config_to_hf", "load", "load_tokenizer", "save"]


# ----------------------------------------------------------------------------- load


def _normalise(idx: tuple, shape: tuple) -> tuple:
    return tuple(slice(*s.indices(n)) for s, n in zip(idx, shape))


@dataclasses.dataclass
class _Source:
    """Where one NNX param comes from: an HF tensor, a layout change, and (SPLIT) a column offset."""

    key: str
    file: str
    kind: str
    part: int
    rule: _Rule


def _plan(cfg: ModelConfig, params: dict[str, Any], files: dict[str, str], where: str) -> dict[str, _Source]:
    """Maps every model param to its HF tensor; names missing and unexpected tensors."""
    rules = key_rules(cfg.flavour)
    sources: dict[str, _Source] = {}
    unexpected = []
    for raw_key, file in files.items():
        key = _hf_name(cfg.flavour, raw_key)
        if _IGNORED.fullmatch(raw_key) or (key == "lm_head.weight" and cfg.tie_embeddings):
            continue
        for rule in rules:
            groups = rule.match_hf(key)
            if groups is None:
                continue
            targets = [t.format(**groups) for t in rule.nnx]
            if all(t in params for t in targets):
                for k, t in enumerate(targets):
                    sources[t] = _Source(raw_key, file, rule.kind, k, rule)
                break
        else:
            unexpected.append(raw_key)
    if unexpected:
        raise UserInputError(f"{where}: tensors this {cfg.flavour} config has no place for: {sorted(unexpected)}")
    missing = sorted(_hf_key(cfg.flavour, p)[0] for p in params if p not in sources)
    if missing:
        raise UserInputError(f"{where}: missing tensors {sorted(set(missing))}")
    return sources



def _split_offsets(src: _Source, params: dict[str, Any], path_groups: dict) -> list[int]:
    widths = [params[t.format(**path_groups)].shape[-1] for t in src.rule.nnx]
    return [0] + [int(x) for x in np.cumsum(widths)]


def _reader(path: str, shape: tuple, dtype, src: _Source, handle, params: dict):
    """read(index) of the HF tensor behind the (per-layer) param `path` of `shape`, in its layout."""
    tensor = handle.get_slice(src.key)
    src_shape = tuple(tensor.get_shape())
    if src.kind == SPLIT:
        offsets = _split_offsets(src, params, src.rule.match_nnx(path)[1])
        expected = shape[:-1] + (offsets[-1],)
    else:
        expected = shape[::-1] if src.kind == TRANSPOSE else shape
    if src_shape != expected:
        raise UserInputError(
            f"{src.file}: tensor {src.key} has shape {list(src_shape)}, expected {list(expected)} for {path}"
        )

    def read(idx):
        try:
            if src.kind == TRANSPOSE:
                block = np.asarray(tensor[idx[1], idx[0]]).T
            elif src.kind == SPLIT:
                last = idx[-1]
                start = offsets[src.part]
                block = np.asarray(tensor[idx[:-1] + (slice(start + last.start, start + last.stop),)])
            else:
                block = np.asarray(tensor[idx] if idx else tensor[:])
        except Exception as e:
            raise UserInputError(f"{src.file}: cannot read tensor {src.key} ({type(e).__name__}: {e})") from None
        return np.ascontiguousarray(block.astype(dtype))

    return read


def _fill(abstract, sharding, readers: list, stacked: bool) -> jax.Array:
    """One param as a (sharded) jax.Array; each device's slice is read from disk on its own.

    stacked: the param is [L, ...] and readers[l] reads layer l's tensor.
    """
    shape = tuple(abstract.shape)
    blocks: dict[tuple, np.ndarray] = {}  # devices that replicate a slice share one read

    def read(idx):
        idx = _normalise(idx, shape)
        memo = tuple((s.start, s.stop) for s in idx)
        if memo not in blocks:
            if stacked:
                layers = range(idx[0].start, idx[0].stop, idx[0].step)
                blocks[memo] = np.stack([readers[l](idx[1:]) for l in layers])
            else:
                blocks[memo] = readers[0](idx)
        return blocks[memo]

    return jax.make_array_from_callback(shape, sharding, read)


def load(path: str | Path, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None):
    """(CausalLM, ModelConfig) from an HF directory, each param placed straight into its shard.

    path: a local directory or a bucket URL (gs://, s3://, az://), read
    in place: ranged reads of the slices this host's devices hold, no copy.
    dtype: parameter and compute dtype (default: the checkpoint's dtype).
    mesh: shard by the logical-axis rules of clue_jax.parallel.rules; None puts
    everything on the first local device.
    """
    directory = paths.absolute(os.fspath(path)).rstrip("/")
    cfg = config_from_hf(read_config(directory), where=paths.join(directory, "config.json"))
    if dtype is not None:
        name = jnp.dtype(dtype).name
        cfg = dataclasses.replace(cfg, dtype=name, param_dtype=name)
    files = weight_files(directory)

    abstract_model = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(abstract_model)
    if mesh is not None:
        from clue_jax.parallel.rules import state_shardings

        shardings = dict(nnx.to_flat_state(state_shardings(abstract, mesh)))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    else:
        replicated = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = None

    def sharding_of(p):
        return replicated if shardings is None else shardings[p].get_value()

    flat = list(nnx.to_flat_state(abstract))
    stacked = {_path_str(p): v.get_value() for p, v in flat if isinstance(v, nnx.Param)}
    views = _per_layer(cfg, stacked)
    params = {name: _layer(stacked, at, abstract=True) for name, at in views.items()}
    sources = _plan(cfg, params, files, directory)
    layer_names: dict[str, list[str]] = {}  # param -> its per-layer names, in layer order
    for name, (param, _) in views.items():
        layer_names.setdefault(param, []).append(name)

    # Non-parameter variables (RoPE tables) are computed, not read: run the
    # constructor under jit and keep only them, so XLA drops the param inits.
    buffers = jax.jit(lambda: nnx.state(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Not(nnx.Param)))()
    buffers = {_path_str(p): v.get_value() for p, v in nnx.to_flat_state(buffers)}

    filled = []
    with contextlib.ExitStack() as stack:
        handles = {}
        for p, var in flat:
            name = _path_str(p)
            if not isinstance(var, nnx.Param):
                filled.append((p, var.replace(jax.device_put(buffers[name], sharding_of(p)))))
                continue
            readers = []
            for layer_name in layer_names[name]:
                src = sources[layer_name]
                if src.file not in handles:
                    handle = open_file(src.file, stack)
                    handles[src.file] = (handle, set(handle.keys()))
                handle, keys = handles[src.file]
                if src.key not in keys:
                    raise UserInputError(f"{src.file}: tensor {src.key} not found (the index names this file)")
                layer = params[layer_name]
                readers.append(_reader(layer_name, tuple(layer.shape), layer.dtype, src, handle, params))
            is_stacked = views[layer_names[name][0]][1] is not None
            array = _fill(var.get_value(), sharding_of(p), readers, is_stacked)
            filled.append((p, var.replace(array)))
    model = nnx.merge(graphdef, nnx.from_flat_state(filled))
    return model, cfg


# ----------------------------------------------------------------------------- save


def save(model: CausalLM, model_config: ModelConfig, path: str | Path, *, max_shard_bytes: int | None = None,
         extra_config: dict | None = None) -> None:
    """Writes config.json and safetensors that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Tensors keep the params' dtype. Tied embeddings write no lm_head (HF ties it).
    max_shard_bytes: split into model-0000k-of-0000n.safetensors + index (None: one file).
    extra_config: extra config.json keys (e.g. bos_token_id, eos_token_id).
    Every process must call it: each HF tensor in turn is all-gathered
    (`to_host`), written by process 0 into the current shard file and
    released, so no host ever holds more than about one tensor of the model.
    A LoRA-adapted model must be merged first (clue_jax.models.lora.merge_lora).
    `path` is a local directory (clue_jax.export uploads to URLs).
    """
    path = Path(path)
    state = nnx.state(model, nnx.Param)
    stacked = {_path_str(p): v.get_value() for p, v in nnx.to_flat_state(state)}
    views = _per_layer(model_config, stacked)
    params = {name: _layer(stacked, at, abstract=True) for name, at in views.items()}
    tensors = _hf_tensors(model_config, params)
    layout = {}
    for key, (rule, parts) in tensors.items():
        dtypes = {np.dtype(params[p].dtype) for p in parts}
        layout[key] = (dtypes.pop(), tuple(_hf_layout(rule, [tuple(params[p].shape) for p in parts])))
    sizes = {key: math.prod(shape) * dtype.itemsize for key, (dtype, shape) in layout.items()}
    shards = plan_shards(sizes, max_shard_bytes)
    hf_config = config_to_hf(model_config)
    hf_config.update(extra_config or {})

    writer = jax.process_index() == 0
    if writer:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for name, keys in zip(names, shards):
        with SafetensorsStream(path / name, [(k, *layout[k]) for k in keys], enabled=writer) as out:
            for key in keys:
                rule, parts = tensors[key]
                arrays = [to_host(_layer(stacked, views[p])) for p in parts]
                if rule.kind == SPLIT:
                    array = np.concatenate(arrays, axis=-1)
                elif rule.kind == TRANSPOSE:
                    array = arrays[0].T
                else:
                    array = arrays[0]
                out.write(key, array)
                del arrays, array
    if writer and len(shards) > 1:
        weight_map = {key: name for name, keys in zip(names, shards) for key in keys}
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    if writer:  # files of an earlier save in the other layout would confuse readers
        stale = [path / INDEX_FILE] if len(shards) == 1 else [path / SINGLE_FILE]
        stale += [f for f in path.glob("model-*-of-*.safetensors") if f.name not in names]
        for f in stale:
            f.unlink(missing_ok=True)


def load_tokenizer(path: str | Path):
    """The HF tokenizer saved beside the weights (a local directory or a URL, read through the cache).

    Delegates to clue_jax.data.tokenizer.load_tokenizer (local files only, and
    BOS/PAD filled from EOS where a checkpoint lacks them), so every tokenizer
    in the project is loaded the same way.
    """
    from clue_jax.data.tokenizer import load_tokenizer as _load

    return _load(paths.local_dir(path))
