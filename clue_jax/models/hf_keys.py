"""HF tensor names <-> NNX param paths of the causal LMs: one table of templates per flavour (the bonsai style).

The same table drives loading and saving (clue_jax.models.hf), so the two
directions cannot drift; it also unstacks the model's [L, ...] layer params
(clue_jax.models.stacking) into the per-layer names HF uses.
"""
from __future__ import annotations

import dataclasses
import re
import string
from typing import Any

import jax

from clue_jax.models.causal_lm import PAIR_NAMES, period
from clue_jax.models.config import ModelConfig

COPY, TRANSPOSE, SPLIT = "copy", "transpose", "split"


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



def _hf_key(flavour: str, path: str) -> tuple[str, _Rule, int]:
    for rule in key_rules(flavour):
        hit = rule.match_nnx(path)
        if hit is not None:
            part, groups = hit
            return rule.hf.format(**groups), rule, part
    raise ValueError(f"parameter {path} has no Hugging Face name (LoRA adapters must be merged first: lora.merge_lora)")



def _hf_tensors(cfg: ModelConfig, params: dict[str, Any]) -> dict[str, tuple[_Rule, list[str]]]:
    """HF name -> (rule, the NNX params it is made of, in order)."""
    out: dict[str, tuple[_Rule, list]] = {}
    for path in params:
        key, rule, part = _hf_key(cfg.flavour, path)
        entry = out.setdefault(key, (rule, [None] * len(rule.nnx)))
        entry[1][part] = path
    return out


# safetensors' dtype names (numpy dtype name -> header code).

def _hf_layout(rule: _Rule, parts: list[tuple]) -> tuple:
    """The HF tensor's shape from its NNX parts' shapes."""
    if rule.kind == SPLIT:
        return parts[0][:-1] + (sum(p[-1] for p in parts),)
    return parts[0][::-1] if rule.kind == TRANSPOSE else parts[0]
