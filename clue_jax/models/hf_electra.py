"""HF ELECTRA checkpoints (config.json + safetensors) <-> clue_jax encoders.

Loading follows the bonsai recipe: build the module abstractly with
`nnx.eval_shape`, map every parameter path to its HF tensor name with a small
regex table (a stacked layer parameter [L, ...] to the L per-layer tensors),
transpose Linear weights (torch stores [out, in], nnx [in, out]),
check the shape, and place each array straight onto its mesh sharding
(`clue_jax.parallel.rules.state_shardings`) with `make_array_from_callback`,
so no device holds more than its shard. Tensors are read whole into host
memory (memory-mapped safetensors, single file or sharded index, through
`clue_jax.models.hf`'s reader): fine for ELECTRA sizes (large is 335M
parameters); PyTorch .bin checkpoints are not read. Saving writes what
`transformers` loads: ElectraForPreTraining, ElectraForMaskedLM or ElectraModel.

kind: "discriminator" -> `ElectraDiscriminator`, "generator" ->
`ElectraGenerator`, "encoder" -> `Encoder` (from an ElectraModel directory or
the `electra.` part of either pre-training checkpoint, as for fine-tuning).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from pathlib import Path

import jax
import numpy as np
import transformers
from flax import nnx
from jax.sharding import Mesh
from safetensors.numpy import save_file

from clue_jax.errors import UserInputError
from clue_jax.models.encoder import (
    ACTIVATIONS,
    ElectraDiscriminator,
    ElectraGenerator,
    ElectraPair,
    Encoder,
    EncoderConfig,
)
from clue_jax.models.hf import _open, _to_host, _weight_files  # shared safetensors reading / host gathering
from clue_jax.parallel.rules import state_shardings

KINDS = ("discriminator", "generator", "encoder")
_MODEL_FOR_KIND = {"discriminator": ElectraDiscriminator, "generator": ElectraGenerator, "encoder": Encoder}
_ARCH_FOR_KIND = {
    "discriminator": "ElectraForPreTraining", "generator": "ElectraForMaskedLM", "encoder": "ElectraModel",
}
_TIED = "generator_lm_head.weight"

# nnx module path (joined with "/", encoder paths rooted at "encoder/") -> HF module name.
# The leaf name maps separately: kernel -> weight (transposed), scale/embedding -> weight, bias -> bias.
# The layers are one stacked module (`stacking`): its [L, ...] parameter is HF's L tensors
# `electra.encoder.layer.{layer}....`, one per layer, stacked in layer order.
_LAYER = "encoder/body/layers/"
_MODULE_RULES = [
    (r"encoder/embeddings/(word_embeddings|position_embeddings|token_type_embeddings)", r"electra.embeddings.\1"),
    (r"encoder/embeddings/layer_norm", "electra.embeddings.LayerNorm"),
    (r"encoder/body/embeddings_project", "electra.embeddings_project"),
    (_LAYER + "(query|key|value)", r"electra.encoder.layer.{layer}.attention.self.\1"),
    (_LAYER + "attention_output", "electra.encoder.layer.{layer}.attention.output.dense"),
    (_LAYER + "attention_norm", "electra.encoder.layer.{layer}.attention.output.LayerNorm"),
    (_LAYER + "intermediate", "electra.encoder.layer.{layer}.intermediate.dense"),
    (_LAYER + "output", "electra.encoder.layer.{layer}.output.dense"),
    (_LAYER + "output_norm", "electra.encoder.layer.{layer}.output.LayerNorm"),
]
_HEAD_RULES = {
    "discriminator": [
        ("head/dense", "discriminator_predictions.dense"),
        ("head/dense_prediction", "discriminator_predictions.dense_prediction"),
    ],
    "generator": [
        ("head/dense", "generator_predictions.dense"),
        ("head/layer_norm", "generator_predictions.LayerNorm"),
        ("head", "generator_lm_head"),  # only its output bias; the weight is the tied word table
    ],
    "encoder": [],
}
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def hf_name(path: tuple, kind: str, prefix: str = "electra.") -> tuple[str, bool]:
    """(HF tensor name, transpose?) for an nnx parameter path of a `kind` model.

    A stacked layer parameter's name keeps a `{layer}` field (see `hf_names`).
    """
    parts = [str(p) for p in path]
    if kind == "encoder":
        parts = ["encoder", *parts]
    module, leaf = "/".join(parts[:-1]), parts[-1]
    for pattern, template in _MODULE_RULES + _HEAD_RULES[kind]:
        m = re.fullmatch(pattern, module)
        if m and leaf in _LEAVES:
            name = f"{m.expand(template)}.{_LEAVES[leaf]}"
            if name.startswith("electra."):
                name = prefix + name[len("electra."):]
            return name, leaf == "kernel"
    raise KeyError(f"no HF name for parameter {'/'.join(parts)} of a {kind}")


def hf_names(path: tuple, kind: str, num_layers: int, prefix: str = "electra.") -> tuple[list[str], bool, bool]:
    """(HF tensor names, transpose?, stacked?): one name, or one per layer for a stacked layer parameter."""
    name, transpose = hf_name(path, kind, prefix)
    if "{layer}" not in name:
        return [name], transpose, False
    return [name.format(layer=i) for i in range(num_layers)], transpose, True


# ----------------------------------------------------------------------------- config


def config_from_hf(hf: transformers.ElectraConfig, *, where: str = "config.json", **overrides) -> EncoderConfig:
    """EncoderConfig from an ElectraConfig; `overrides` set clue_jax-only fields (dtype, dropout, remat)."""
    if getattr(hf, "is_decoder", False):
        raise UserInputError(f"{where}: is_decoder=true; clue_jax's encoder is bidirectional only")
    pos = getattr(hf, "position_embedding_type", "absolute")
    if pos != "absolute":
        raise UserInputError(f"{where}: position_embedding_type={pos!r} is not supported (only 'absolute')")
    if hf.hidden_act not in ACTIVATIONS:
        raise UserInputError(f"{where}: hidden_act={hf.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
    values = dict(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        embedding_size=hf.embedding_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        intermediate_size=hf.intermediate_size,
        max_len=hf.max_position_embeddings,
        type_vocab_size=hf.type_vocab_size,
        layer_norm_eps=hf.layer_norm_eps,
        hidden_act=hf.hidden_act,
        dropout=float(hf.hidden_dropout_prob),
    )
    fields = sorted(f.name for f in dataclasses.fields(EncoderConfig))
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise UserInputError(f"unknown EncoderConfig override(s) {unknown} for {where}; valid keys: {fields}")
    values.update(overrides)
    return EncoderConfig.from_dict(values, where=where)


def config_to_hf(cfg: EncoderConfig, kind: str) -> transformers.ElectraConfig:
    return transformers.ElectraConfig(
        vocab_size=cfg.vocab_size,
        embedding_size=cfg.embedding_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act=cfg.hidden_act,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.max_len,
        type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps,
        tie_word_embeddings=True,
        architectures=[_ARCH_FOR_KIND[kind]],
        dtype=cfg.param_dtype,
    )


def _read_config(path: Path) -> transformers.ElectraConfig:
    file = path / "config.json"
    if not file.is_file():
        raise UserInputError(f"{file}: no config.json in the checkpoint directory")
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserInputError(f"{file}: unreadable JSON ({e})") from e
    if not isinstance(raw, dict):
        raise UserInputError(f"{file}: expected a JSON object")
    if raw.get("model_type", "electra") != "electra":
        raise UserInputError(f"{file}: model_type={raw.get('model_type')!r}, expected 'electra'")
    try:
        return transformers.ElectraConfig.from_dict(raw)
    except Exception as e:  # strict dataclass validation raises several types
        raise UserInputError(f"{file}: not a valid ELECTRA config ({e})") from e


# ----------------------------------------------------------------------------- tensors


def _read_tensors(files: dict[str, Path], names: list[str]) -> dict[str, np.ndarray]:
    """Reads only `names` (memory-mapped), opening each file once; errors name the file and tensor."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    with contextlib.ExitStack() as stack:
        for file, wanted in by_file.items():
            handle = _open(file, stack)
            for name in wanted:
                try:
                    out[name] = handle.get_tensor(name)
                except Exception as e:  # safetensors raises SafetensorError, OSError, ...
                    raise UserInputError(f"{file}: cannot read tensor {name} ({type(e).__name__}: {e})") from None
    return out


def _place(array: np.ndarray, sharding):
    """Host array -> device array on `sharding` (each process fills only its own shards)."""
    if sharding is None:
        return jax.numpy.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


# ----------------------------------------------------------------------------- load / save


def load_electra(
    path: str | os.PathLike,
    kind: str = "discriminator",
    mesh: Mesh | None = None,
    **overrides,
):
    """Loads an HF ELECTRA directory; returns (module, EncoderConfig).

    `overrides` set clue_jax-only config fields (dtype, param_dtype, remat,
    dropout; dropout defaults to the checkpoint's hidden_dropout_prob and is
    active only when a dropout_key is passed). With a mesh, every parameter is
    created directly with its sharding from the logical-axis rules.
    """
    if kind not in KINDS:
        raise UserInputError(f"kind={kind!r} is not one of {KINDS}")
    path = Path(path)
    if not path.is_dir():
        raise UserInputError(f"{path}: not a checkpoint directory")
    cfg = config_from_hf(_read_config(path), where=str(path / "config.json"), **overrides)
    index = _weight_files(path)  # tensor name -> file (single file or sharded index)
    # An encoder may come from ElectraModel (no prefix) or from a pre-training checkpoint ("electra.").
    prefix = "electra."
    if kind == "encoder" and "electra.embeddings.word_embeddings.weight" not in index:
        prefix = ""

    model_cls = _MODEL_FOR_KIND[kind]
    abstract = nnx.eval_shape(lambda: model_cls(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat_shardings = dict(nnx.to_flat_state(state_shardings(state, mesh))) if mesh is not None else {}
    flat = nnx.to_flat_state(state)
    names = {p: hf_names(p, kind, cfg.num_layers, prefix) for p, _ in flat}
    wanted = [n for ns, _, _ in names.values() for n in ns]
    if kind == "generator" and _TIED in index:
        wanted.append(_TIED)
    missing = [n for n in wanted if n not in index]
    if missing:
        heads_only = kind != "encoder" and not any(n.startswith("electra.") for n in missing)
        hint = f" (is it a {kind} checkpoint?)" if heads_only else ""
        raise UserInputError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}{hint}")
    tensors = _read_tensors(index, wanted)

    leaves = []
    for p, var in flat:
        layer_names, transpose, stacked = names[p]
        expected = var.get_value().shape
        arrays = []
        for name in layer_names:
            array = tensors[name].T if transpose else tensors[name]
            if tuple(array.shape) != tuple(expected[1:] if stacked else expected):
                raise UserInputError(
                    f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, config.json implies "
                    f"{tuple(expected[1:] if stacked else expected)}{' (transposed)' if transpose else ''}"
                )
            arrays.append(array)
        array = np.stack(arrays) if stacked else arrays[0]
        array = np.ascontiguousarray(array, dtype=cfg.weights_dtype)
        sharding = flat_shardings[p].get_value() if p in flat_shardings else None
        leaves.append((p, var.replace(_place(array, sharding))))
    if kind == "generator" and _TIED in tensors:
        word = tensors["electra.embeddings.word_embeddings.weight"]
        if not np.allclose(tensors[_TIED], word, atol=1e-6):
            raise UserInputError(
                f"{path}: {_TIED} differs from the word embeddings; untied generator heads are not supported"
            )
    model = nnx.merge(graphdef, nnx.from_flat_state(leaves))
    return model, cfg


def _export_parts(module, cfg: EncoderConfig, kind: str):
    """The standalone module to export for `kind`, and its config."""
    if isinstance(module, ElectraPair):
        want = module.gen_cfg if kind == "generator" else module.disc_cfg
        if cfg != want:
            raise UserInputError(f"save_electra: cfg does not match the pair's {kind} config")
        module = module.generator_model() if kind == "generator" else module.discriminator_model()
    if kind == "encoder" and isinstance(module, (ElectraDiscriminator, ElectraGenerator)):
        module = module.encoder
    if not isinstance(module, _MODEL_FOR_KIND[kind]):
        need, got = _MODEL_FOR_KIND[kind].__name__, type(module).__name__
        raise TypeError(f"save_electra(kind={kind!r}) needs a {need} (or an ElectraPair), got {got}")
    if module.cfg != cfg:
        raise UserInputError(f"save_electra: cfg does not match the module's config ({module.cfg} vs {cfg})")
    return module


def save_electra(module, cfg: EncoderConfig, path: str | os.PathLike, kind: str = "discriminator") -> Path:
    """Writes config.json + model.safetensors that `transformers` loads for `kind`.

    `module` is the matching standalone model (or an ElectraPair, whose
    generator or discriminator half is exported; or any of them for "encoder").
    The generator's output weight is the tied word table, so it is not written.
    Only process 0 writes. Returns the directory.
    """
    if kind not in KINDS:
        raise UserInputError(f"kind={kind!r} is not one of {KINDS}")
    module = _export_parts(module, cfg, kind)
    prefix = "" if kind == "encoder" else "electra."
    tensors = {}
    for p, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        layer_names, transpose, stacked = hf_names(p, kind, cfg.num_layers, prefix)
        array = _to_host(var.get_value())
        for name, one in zip(layer_names, array if stacked else [array]):
            tensors[name] = np.ascontiguousarray(one.T if transpose else one)
    path = Path(path)
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
        config_to_hf(cfg, kind).to_json_file(path / "config.json")
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path
