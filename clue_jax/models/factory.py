"""Build a model from its config directly onto the mesh, and save/restore its weights.

`create` initialises under jit with out_shardings taken from the parameters'
logical names, so a large model is born sharded instead of on one device.
`save_params`/`load_params` store a finished model (a pipeline stage's output)
in the model store (clue_jax.models.store: checksummed, restored sharded); a
load checks the saved config against the expected one and returns the weights
in the dtypes of `precision` (train.precision, clue_jax.models.precision;
float32 masters under "mixed"). Paths may be URLs (clue_jax.workdir_fs); HF
checkpoint directories there are read in place (clue_jax.models.hf). A LoRA
stage's directory holds only its adapters: `load_params` returns its base model
with them merged (clue_jax.models.lora.load_merged).
"""
from __future__ import annotations

import functools
import json

import jax
from flax import nnx

from clue_jax import workdir_fs as paths  # the one path layer (local or gs://, s3://, az://)
from clue_jax.errors import UserInputError
from clue_jax.models.causal_lm import CausalLM
from clue_jax.models import lora
from clue_jax.models import precision as precision_lib
from clue_jax.models import store
from clue_jax.models.config import ModelConfig
from clue_jax.parallel import rules as shard_lib


def create(cfg: ModelConfig, seed: int, mesh) -> CausalLM:
    return store.create(lambda s: CausalLM(cfg, rngs=nnx.Rngs(jax.random.key(s))), seed,
                        functools.partial(shard_lib.state_shardings, mesh=mesh), (cfg, mesh))


def save_params(model: nnx.Module, cfg: ModelConfig, directory: str) -> None:
    """Params, checksums and model_config.json; `directory` may be a URL orbax's epath reaches (gs://)."""
    store.save(model, directory, {"model_config.json": cfg.to_dict()})


def is_hf_directory(directory: str) -> bool:
    """An HF checkpoint (config.json, no model_config.json); local or a URL."""
    return paths.exists(paths.join(directory, "config.json")) and not paths.exists(
        paths.join(directory, "model_config.json"))


def load_params(directory: str, mesh, expected: ModelConfig | None = None,
                precision: str = "checkpoint") -> tuple[CausalLM, ModelConfig]:
    """Restores a model saved by `save_params` (or an HF checkpoint directory, local or a URL), placed on `mesh`.

    `expected` is compared with a clue_jax directory's saved config (an HF directory is taken as it is);
    the returned config is the one `precision` trains in (the saved one under "checkpoint").
    """
    directory = paths.absolute(directory)
    if paths.exists(paths.join(directory, lora.ADAPTERS_FILE)):  # a LoRA stage: its adapters, merged on load
        return lora.load_merged(directory, mesh, precision)
    if is_hf_directory(directory):
        from clue_jax.models import hf

        cfg = precision_lib.model_config(read_config(directory), precision)
        model, loaded = hf.load(directory, dtype=None if precision == "checkpoint" else cfg.param_dtype, mesh=mesh)
        return (model, loaded) if loaded == cfg else (precision_lib.regraph(model, cfg), cfg)
    saved_cfg = read_config(directory)
    if expected is not None and saved_cfg != expected:
        raise UserInputError(f"model in {directory} has another config than the one asked for")
    cfg = precision_lib.model_config(saved_cfg, precision)
    graphdef, params, _ = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
    saved = nnx.split(nnx.eval_shape(lambda: CausalLM(saved_cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)[1]
    shardings = shard_lib.state_shardings(params, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings)
    restored = store.restore(directory, target, None if saved_cfg == cfg else saved)
    model = nnx.merge(graphdef, restored, _concrete_rest(cfg, mesh))
    return model, cfg


def read_config(directory: str) -> ModelConfig:
    """The architecture of a saved model (clue_jax or HF directory, local or a URL) without reading its weights."""
    directory = paths.absolute(directory)
    if is_hf_directory(directory):
        from clue_jax.models import hf

        config_path = paths.join(directory, "config.json")
        return hf.config_from_hf(_read_json(config_path), where=config_path)
    config_path = paths.join(directory, "model_config.json")
    return ModelConfig.from_dict(_read_json(config_path), where=config_path)


def _read_json(path: str) -> dict:
    try:
        return json.loads(paths.read_text(path))
    except (OSError, json.JSONDecodeError) as err:
        raise UserInputError(f"cannot read model config {path}: {' '.join(str(err).split())}") from None


def check_fits(cfg: ModelConfig, *, tokens: int, seq_len: int, model: str, seq_key: str) -> None:
    """A model must embed every token id of the tokenizer and every position of the rows it reads.

    Past either end the embedding lookup reads out of range: NaN losses or silent garbage, not an error.
    """
    if cfg.vocab_size < tokens:
        raise UserInputError(
            f"{model} has vocab_size={cfg.vocab_size}, fewer than the tokenizer's {tokens} tokens: use the "
            "model's own tokenizer (--config.tokenizer.path= empty, or its directory) or a model with a larger vocabulary")
    if cfg.max_len < seq_len:
        raise UserInputError(
            f"{model} ({cfg.flavour}) has max_len={cfg.max_len} positions, fewer than {seq_key}={seq_len}: "
            f"lower --config.{seq_key} to at most {cfg.max_len}")


def _concrete_rest(cfg: ModelConfig, mesh):
    """Non-parameter state (RoPE tables): cheap to rebuild, so it is not saved."""
    def build():
        return nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)[2]

    return jax.jit(build, out_shardings=shard_lib.state_shardings(jax.eval_shape(build), mesh))()
