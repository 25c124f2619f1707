"""Hugging Face config.json <-> ModelConfig for the causal LMs (GPT-2, LLaMA incl. LLaMA-3, Gemma-2).

Kept apart from the weights (clue_jax.models.hf): reading an architecture must
not need the tensors, and a missing or unsupported key is named with its file.
"""
from __future__ import annotations

from typing import Any

from clue_jax.errors import UserInputError
from clue_jax.models.config import ModelConfig

_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "gemma2": "Gemma2ForCausalLM"}
_MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama", "gemma2": "gemma2"}
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "float": "float32", "half": "float16"}

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
