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
one tensor, never the model. A checkpoint at a URL (gs://...) is loaded from a local cached copy.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import string
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from clue_jax import paths
from clue_jax.errors import UserInputError
from clue_jax.models.causal_lm import PAIR_NAMES, CausalLM, period
from clue_jax.models.config import ModelConfig

COPY, TRANSPOSE, SPLIT = "copy", "transpose", "split"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "gemma2": "Gemma2ForCausalLM"}
_MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama", "gemma2": "gemma2"}
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "float": "float32", "half": "float16"}


# ----------------------------------------------------------------------------- config


class _Reader:
    """Reads keys from an HF config dict; a missing required key names the file and key."""

    def __init__(self, d: dict, where: str):
        self.d, self.where = d, where

    def req(self, key: str):
        if self.d.get(key) is None:
            raise UserInputError(f"{self.where}: missing required key {key!r}")
        return self.d[key]

    def get(self, key: str, default=None):
        value = self.d.get(key)
        return default if value is None else value

    def num(self, key: str, kind=int, default=None):
        """A number (required when default is None), as int or float."""
        value = self.req(key) if default is None else self.get(key, default)
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise UserInputError(f"{self.where}: {key}={value!r} is not a number") from None

    def expect(self, key: str, allowed: tuple, default):
        value = self.get(key, default)
        if value not in allowed:
            raise UserInputError(f"{self.where}: {key}={value!r} is not supported (supported: {allowed})")
        return value


def _dtype_from_hf(r: _Reader) -> str:
    name = r.get("dtype", r.get("torch_dtype", "float32"))
    name = str(name).replace("torch.", "")
    if name not in _DTYPES:
        raise UserInputError(f"{r.where}: dtype {name!r} is not supported (supported: {sorted(_DTYPES)})")
    return _DTYPES[name]


def _rope_from_hf(r: _Reader) -> tuple[float, tuple]:
    """(rope_theta, rope_scaling) from v5 `rope_parameters` or the older rope_theta + rope_scaling."""
    params = r.get("rope_parameters")
    key = "rope_parameters"
    if params is None:
        params = dict(r.get("rope_scaling", {}) or {})
        params.setdefault("rope_theta", r.get("rope_theta", 10000.0))
        key = "rope_scaling"
    if not isinstance(params, dict):
        raise UserInputError(f"{r.where}: {key} must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", r.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return theta, ()
    if rope_type != "llama3":
        raise UserInputError(f"{r.where}: {key}.rope_type={rope_type!r} is not supported (supported: default, llama3)")
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [f for f in fields if params.get(f) is None]
    if missing:
        raise UserInputError(f"{r.where}: {key} (llama3) is missing {missing}")
    return theta, tuple(float(params[f]) for f in fields[:3]) + (int(params[fields[3]]),)


def config_from_hf(hf_config: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """ModelConfig from an HF config.json dict; `where` (the file path) goes into error messages."""
    if not isinstance(hf_config, dict):
        raise UserInputError(f"{where}: expected a JSON object, got {type(hf_config).__name__}")
    try:
        return _config_from_hf(hf_config, where)
    except UserInputError as e:
        if str(e).startswith(where):
            raise
        raise UserInputError(f"{where}: {e}") from None  # ModelConfig's own checks name model.* fields


def _config_from_hf(hf_config: dict[str, Any], where: str) -> ModelConfig:
    r = _Reader(hf_config, where)
    model_type = r.req("model_type")
    dtype = _dtype_from_hf(r)
    common = dict(vocab_size=r.num("vocab_size"), dtype=dtype, param_dtype=dtype)
    if model_type == "gpt2":
        d_model, heads = r.num("n_embd"), r.num("n_head")
        r.expect("activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
        r.expect("scale_attn_weights", (True,), True)
        r.expect("scale_attn_by_inverse_layer_idx", (False,), False)
        if r.get("add_cross_attention", False):
            raise UserInputError(f"{where}: add_cross_attention=true is not supported")
        return ModelConfig(
            flavour="gpt2", d_model=d_model, num_layers=r.num("n_layer"), num_heads=heads,
            mlp_dim=r.num("n_inner", int, 4 * d_model), max_len=r.num("n_positions", int, 1024),
            norm_eps=r.num("layer_norm_epsilon", float, 1e-5), tie_embeddings=bool(r.get("tie_word_embeddings", True)),
            use_bias=True, **common,
        )
    if model_type not in ("llama", "gemma2"):
        raise UserInputError(
            f"{where}: model_type={model_type!r} is not supported (supported: {sorted(_MODEL_TYPES.values())})"
        )
    d_model, heads = r.num("hidden_size"), r.num("num_attention_heads")
    theta, scaling = _rope_from_hf(r)
    attention_bias = bool(r.get("attention_bias", False))
    mlp_bias = bool(r.get("mlp_bias", False)) if model_type == "llama" else False
    if attention_bias != mlp_bias:
        raise UserInputError(f"{where}: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported")
    kw = dict(
        d_model=d_model, num_layers=r.num("num_hidden_layers"), num_heads=heads,
        # Missing keys take transformers' own defaults (Gemma2Config: 4 kv heads, head_dim 256).
        num_kv_heads=r.num("num_key_value_heads", int, heads if model_type == "llama" else 4),
        head_dim=r.num("head_dim", int, d_model // heads if model_type == "llama" else 256),
        mlp_dim=r.num("intermediate_size"), rope_theta=theta, rope_scaling=scaling, use_bias=attention_bias,
    )
    if model_type == "llama":
        r.expect("hidden_act", ("silu",), "silu")
        return ModelConfig(
            flavour="llama", max_len=r.num("max_position_embeddings", int, 2048),
            norm_eps=r.num("rms_norm_eps", float, 1e-6), tie_embeddings=bool(r.get("tie_word_embeddings", False)),
            **kw, **common,
        )
    act = r.get("hidden_activation", r.get("hidden_act", "gelu_pytorch_tanh"))
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise UserInputError(f"{where}: hidden_activation={act!r} is not supported (supported: gelu_pytorch_tanh)")
    # An explicit null means no window (as in transformers); a missing key means its 4096 default.
    window = r.num("sliding_window", int, 4096) if hf_config.get("sliding_window", 4096) is not None else 0
    layer_types = r.get("layer_types")
    if layer_types is not None:
        expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(kw["num_layers"])]
        if all(t == "full_attention" for t in layer_types):
            window = 0
        elif list(layer_types) != expected:
            raise UserInputError(
                f"{where}: layer_types={layer_types} is not supported (only Gemma-2's alternation {expected})"
            )
    return ModelConfig(
        flavour="gemma2", max_len=r.num("max_position_embeddings", int, 8192),
        norm_eps=r.num("rms_norm_eps", float, 1e-6), tie_embeddings=bool(r.get("tie_word_embeddings", True)),
        sliding_window=window, attn_logit_softcap=r.num("attn_logit_softcapping", float, 0.0),
        final_logit_softcap=r.num("final_logit_softcapping", float, 0.0),
        query_pre_attn_scalar=r.num("query_pre_attn_scalar", float, 256), **kw, **common,
    )


def _int_if_whole(x: float):
    """transformers' strict config fields want an int where the value is integral."""
    return int(x) if float(x).is_integer() else x


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json dict that transformers reads back into the same architecture."""
    d: dict[str, Any] = {
        "model_type": _MODEL_TYPES[cfg.flavour],
        "architectures": [_ARCHITECTURES[cfg.flavour]],
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": cfg.param_dtype,
    }
    if cfg.flavour == "gpt2":
        if cfg.kv_heads != cfg.num_heads or cfg.head_size * cfg.num_heads != cfg.d_model or not cfg.use_bias:
            raise ValueError("GPT-2 export needs num_kv_heads == num_heads, head_dim * num_heads == d_model, use_bias")
        d.update(
            n_embd=cfg.d_model, n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.mlp_dim,
            n_positions=cfg.max_len, layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new",
            scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        return d
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        factor, low, high, original = cfg.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": factor, "low_freq_factor": low,
                "high_freq_factor": high, "original_max_position_embeddings": int(original)}
    d.update(
        hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_size,
        max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps, attention_bias=cfg.use_bias,
        attention_dropout=0.0, rope_parameters=rope,
    )
    if cfg.flavour == "llama":
        d.update(hidden_act="silu", mlp_bias=cfg.use_bias)
        return d
    if cfg.use_bias:
        raise ValueError("Gemma-2 export does not support use_bias=True (HF Gemma-2 has no MLP biases)")
    layer_types = [
        "sliding_attention" if cfg.is_sliding_layer(i) else "full_attention" for i in range(cfg.num_layers)
    ]
    d.update(
        hidden_activation="gelu_pytorch_tanh", layer_types=layer_types,
        sliding_window=cfg.sliding_window or None, attn_logit_softcapping=cfg.attn_logit_softcap or None,
        final_logit_softcapping=cfg.final_logit_softcap or None,
        query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar or cfg.head_size),
    )
    return d


# ----------------------------------------------------------------------------- key map


@dataclasses.dataclass(frozen=True)
class _Rule:
    """One HF tensor <-> one or more NNX params. {i} is a layer index, {p} one of `choices`.

    kind: COPY (same layout), TRANSPOSE (torch Linear [out, in] -> [in, out]),
    SPLIT (GPT-2's fused c_attn: the NNX params are consecutive column blocks).
    """

    hf: str
    nnx: tuple[str, ...]
    kind: str = COPY
    choices: tuple[str, ...] = ()

    def _regex(self, template: str) -> re.Pattern:
        out = ""
        for literal, field, _, _ in string.Formatter().parse(template):
            out += re.escape(literal)
            if field == "i":
                out += r"(?P<i>\d+)"
            elif field is not None:
                out += f"(?P<{field}>{'|'.join(map(re.escape, self.choices))})"
        return re.compile(out)

    def match_hf(self, key: str) -> dict | None:
        m = self._regex(self.hf).fullmatch(key)
        return None if m is None else m.groupdict()

    def match_nnx(self, path: str) -> tuple[int, dict] | None:
        for k, template in enumerate(self.nnx):
            m = self._regex(template).fullmatch(path)
            if m is not None:
                return k, m.groupdict()
        return None


def _decoder_rules(norms: dict[str, str]) -> list[_Rule]:
    rules = [
        _Rule("model.embed_tokens.weight", ("embed_tokens.embedding",)),
        _Rule("model.layers.{i}.self_attn.{p}_proj.weight", ("blocks.{i}.attn.{p}_proj.kernel",), TRANSPOSE,
              tuple("qkvo")),
        _Rule("model.layers.{i}.self_attn.{p}_proj.bias", ("blocks.{i}.attn.{p}_proj.bias",), COPY, tuple("qkvo")),
        _Rule("model.layers.{i}.mlp.{p}_proj.weight", ("blocks.{i}.mlp.{p}_proj.kernel",), TRANSPOSE,
              ("gate", "up", "down")),
        _Rule("model.layers.{i}.mlp.{p}_proj.bias", ("blocks.{i}.mlp.{p}_proj.bias",), COPY, ("gate", "up", "down")),
        _Rule("model.norm.weight", ("final_norm.scale",)),
        _Rule("lm_head.weight", ("lm_head.kernel",), TRANSPOSE),
    ]
    rules += [_Rule(f"model.layers.{{i}}.{hf}.weight", (f"blocks.{{i}}.{ours}.scale",)) for hf, ours in norms.items()]
    return rules


def _gpt2_rules() -> list[_Rule]:
    h = "transformer.h.{i}"
    rules = [
        _Rule("transformer.wte.weight", ("embed_tokens.embedding",)),
        _Rule("transformer.wpe.weight", ("embed_positions.embedding",)),
        _Rule("lm_head.weight", ("lm_head.kernel",), TRANSPOSE),
    ]
    for w, ours in (("weight", "kernel"), ("bias", "bias")):
        qkv = tuple(f"blocks.{{i}}.attn.{p}_proj.{ours}" for p in "qkv")
        rules += [
            _Rule(f"{h}.attn.c_attn.{w}", qkv, SPLIT),
            _Rule(f"{h}.attn.c_proj.{w}", (f"blocks.{{i}}.attn.o_proj.{ours}",)),  # Conv1D is already [in, out]
            _Rule(f"{h}.mlp.c_fc.{w}", (f"blocks.{{i}}.mlp.up_proj.{ours}",)),
            _Rule(f"{h}.mlp.c_proj.{w}", (f"blocks.{{i}}.mlp.down_proj.{ours}",)),
        ]
    for w, ours in (("weight", "scale"), ("bias", "bias")):
        rules += [
            _Rule(f"{h}.ln_1.{w}", (f"blocks.{{i}}.input_norm.{ours}",)),
            _Rule(f"{h}.ln_2.{w}", (f"blocks.{{i}}.mlp_norm.{ours}",)),
            _Rule(f"transformer.ln_f.{w}", (f"final_norm.{ours}",)),
        ]
    return rules


def key_rules(flavour: str) -> list[_Rule]:
    """The HF <-> NNX name table of a flavour."""
    if flavour == "gpt2":
        return _gpt2_rules()
    if flavour == "llama":
        return _decoder_rules({"input_layernorm": "input_norm", "post_attention_layernorm": "mlp_norm"})
    return _decoder_rules({
        "input_layernorm": "input_norm", "post_attention_layernorm": "post_attn_norm",
        "pre_feedforward_layernorm": "mlp_norm", "post_feedforward_layernorm": "post_mlp_norm",
    })


# Buffers some checkpoints carry that are recomputed here (GPT-2's causal mask, old RoPE tables).
_IGNORED = re.compile(r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias|.*rotary_emb\.inv_freq")


def _hf_name(flavour: str, key: str) -> str:
    """Original GPT-2 checkpoints lack the `transformer.` prefix that GPT2LMHeadModel writes."""
    if flavour == "gpt2" and not key.startswith(("transformer.", "lm_head.")):
        return "transformer." + key
    return key


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _per_layer(cfg: ModelConfig, params: dict[str, Any]) -> dict[str, tuple[str, int | None]]:
    """The per-layer names the rules use (blocks.{i}.…) for the model's stacked params.

    A stacked param blocks.<rest> [L, ...] (or blocks.sliding|full.<rest>
    [L/2, ...], Gemma-2's pairs) is L per-layer params blocks.{i}.<rest>.
    Returns name -> (param path, index along its layers axis; None if unstacked).
    """
    per_step = period(cfg)
    out: dict[str, tuple[str, int | None]] = {}
    for path in params:
        parts = path.split(".")
        if parts[0] != "blocks":
            out[path] = (path, None)
            continue
        paired = per_step == 2
        offset = PAIR_NAMES.index(parts[1]) if paired else 0
        rest = ".".join(parts[2:] if paired else parts[1:])
        for step in range(cfg.num_layers // per_step):
            out[f"blocks.{step * per_step + offset}.{rest}"] = (path, step)
    return out


def _layer(params: dict[str, Any], at: tuple[str, int | None], abstract: bool = False):
    """One layer's slice of a stacked param (the param itself if unstacked); abstract: only its shape."""
    path, index = at
    value = params[path]
    if index is None:
        return jax.ShapeDtypeStruct(value.shape, value.dtype) if abstract else value
    if abstract:
        return jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
    return value[index]


# ----------------------------------------------------------------------------- load


def _read_config(path: Path) -> dict:
    file = path / "config.json"
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise UserInputError(f"{file}: not found (expected a Hugging Face model directory)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserInputError(f"{file}: unreadable config ({e})") from None


def _weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file. Like transformers: model.safetensors first, else the index."""
    single = path / SINGLE_FILE
    if single.exists():
        with contextlib.ExitStack() as stack:
            return {key: single for key in _open(single, stack).keys()}
    index = path / INDEX_FILE
    if not index.exists():
        raise UserInputError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found (only safetensors is supported)")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return {str(key): path / str(name) for key, name in weight_map.items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise UserInputError(f"{index}: unreadable index ({type(e).__name__}: {e})") from None


def _open(file: Path, stack: contextlib.ExitStack):
    """Opens a safetensors file (memory-mapped); a bad header or a missing file names the file."""
    try:
        handle = safe_open(str(file), framework="numpy")
    except FileNotFoundError:
        raise UserInputError(f"{file}: not found") from None
    except Exception as e:  # safetensors raises SafetensorError, OSError, ValueError ...
        raise UserInputError(f"{file}: unreadable safetensors file ({type(e).__name__}: {e})") from None
    return stack.enter_context(handle)


def _normalise(idx: tuple, shape: tuple) -> tuple:
    return tuple(slice(*s.indices(n)) for s, n in zip(idx, shape))


@dataclasses.dataclass
class _Source:
    """Where one NNX param comes from: an HF tensor, a layout change, and (SPLIT) a column offset."""

    key: str
    file: Path
    kind: str
    part: int
    rule: _Rule


def _plan(cfg: ModelConfig, params: dict[str, Any], files: dict[str, Path], where: Path) -> dict[str, _Source]:
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


def _hf_key(flavour: str, path: str) -> tuple[str, _Rule, int]:
    for rule in key_rules(flavour):
        hit = rule.match_nnx(path)
        if hit is not None:
            part, groups = hit
            return rule.hf.format(**groups), rule, part
    raise ValueError(f"parameter {path} has no Hugging Face name (LoRA adapters must be merged first: lora.merge_lora)")


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

    path: a local directory or a URL (gs://..., any fsspec filesystem), which
    is first copied to a local cache (clue_jax.paths.local_dir): safetensors
    memory-maps local files. Errors name the URL, not the cache.
    dtype: parameter and compute dtype (default: the checkpoint's dtype).
    mesh: shard by the logical-axis rules of clue_jax.parallel.rules; None puts
    everything on the first local device.
    """
    source = os.fspath(path)
    local = paths.local_dir(source)
    try:
        return _load_local(Path(local), dtype, mesh)
    except UserInputError as err:
        if local == paths.absolute(source):
            raise
        raise UserInputError(str(err).replace(local, source.rstrip("/"))) from None


def _load_local(path: Path, dtype: str | None, mesh):
    cfg = config_from_hf(_read_config(path), where=str(path / "config.json"))
    if dtype is not None:
        name = jnp.dtype(dtype).name
        cfg = dataclasses.replace(cfg, dtype=name, param_dtype=name)
    files = _weight_files(path)

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
    sources = _plan(cfg, params, files, path)
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
                    handle = _open(src.file, stack)
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


def _to_host(x: jax.Array) -> np.ndarray:
    """Whole array on this host; arrays spread over several hosts are all-gathered."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _hf_tensors(cfg: ModelConfig, params: dict[str, Any]) -> dict[str, tuple[_Rule, list[str]]]:
    """HF name -> (rule, the NNX params it is made of, in order)."""
    out: dict[str, tuple[_Rule, list]] = {}
    for path in params:
        key, rule, part = _hf_key(cfg.flavour, path)
        entry = out.setdefault(key, (rule, [None] * len(rule.nnx)))
        entry[1][part] = path
    return out


# safetensors' dtype names (numpy dtype name -> header code).
_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int32": "I32", "int64": "I64"}


class _SafetensorsStream:
    """Writes one safetensors file a tensor at a time.

    safetensors' own writers (save_file, serialize_file) take every tensor of a
    file in memory at once; a shard of a large model would then sit whole on
    one host. The format is a little-endian u64 header length, a JSON header
    (dtype, shape, byte offsets; padded to 8 bytes), then the raw tensors in
    offset order, so the header can be written from the shapes before any
    tensor exists, and each tensor is appended and released as it arrives.
    enabled=False (processes other than 0) writes nothing.
    """

    def __init__(self, file: Path, entries: list[tuple[str, np.dtype, tuple]], enabled: bool):
        self.entries, self.next, self.file = entries, 0, None
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, dtype, shape in entries:
            size = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": _ST_DTYPES[dtype.name], "shape": list(shape),
                           "data_offsets": [offset, offset + size]}
            offset += size
        if enabled:
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            self.file = open(file, "wb")
            self.file.write(len(blob).to_bytes(8, "little") + blob)

    def write(self, key: str, array: np.ndarray) -> None:
        name, dtype, shape = self.entries[self.next]
        if (key, np.dtype(array.dtype), tuple(array.shape)) != (name, dtype, shape):
            raise ValueError(f"tensor {key} {array.dtype}{list(array.shape)} out of order or not as planned")
        self.next += 1
        if self.file is not None:
            self.file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)  # bf16 has no buffer format

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()
        if exc[0] is None and self.next != len(self.entries):
            raise ValueError(f"{len(self.entries) - self.next} planned tensors were not written")


def _hf_layout(rule: _Rule, parts: list[tuple]) -> tuple:
    """The HF tensor's shape from its NNX parts' shapes."""
    if rule.kind == SPLIT:
        return parts[0][:-1] + (sum(p[-1] for p in parts),)
    return parts[0][::-1] if rule.kind == TRANSPOSE else parts[0]


def _plan_shards(sizes: dict[str, int], max_shard_bytes: int | None) -> list[list[str]]:
    """HF keys in name order, cut into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(sizes):
        if max_shard_bytes and shards[-1] and size + sizes[key] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += sizes[key]
    return shards


def save(model: CausalLM, model_config: ModelConfig, path: str | Path, *, max_shard_bytes: int | None = None,
         extra_config: dict | None = None) -> None:
    """Writes config.json and safetensors that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Tensors keep the params' dtype. Tied embeddings write no lm_head (HF ties it).
    max_shard_bytes: split into model-0000k-of-0000n.safetensors + index (None: one file).
    extra_config: extra config.json keys (e.g. bos_token_id, eos_token_id).
    Every process must call it: each HF tensor in turn is all-gathered
    (`_to_host`), written by process 0 into the current shard file and
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
    shards = _plan_shards(sizes, max_shard_bytes)
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
        with _SafetensorsStream(path / name, [(k, *layout[k]) for k in keys], enabled=writer) as out:
            for key in keys:
                rule, parts = tensors[key]
                arrays = [_to_host(_layer(stacked, views[p])) for p in parts]
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
