"""Bidirectional BERT/ELECTRA encoder in Flax NNX, with token-level heads (losses: `encoder_losses`).

The architecture is HF `ElectraModel`'s: word + absolute position + token-type
embeddings -> LayerNorm (-> `embeddings_project` when embedding_size differs
from hidden_size) -> post-LN layers (self-attention with biases -> dense ->
residual -> LayerNorm; dense -> GELU -> dense -> residual -> LayerNorm).

Shared embeddings (ELECTRA ties G's and D's whole embedding layer: word,
position, token-type tables and their LayerNorm). The module tree is split so
that sharing needs no shared references: `Embeddings` is one module,
`EncoderBody` is the rest (projection + layers), and `Encoder` is simply the
two together. `ElectraPair` holds ONE `Embeddings` plus two bodies (generator
and discriminator, each with its own `embeddings_project` because their
widths differ) and the MLM head reads the word table from that same module at
call time. The parameter therefore exists once in `nnx.state(pair)`, receives
gradient from both losses, and checkpoints / weight soups see plain paths.

Layers: `EncoderBody.layers` is ONE `EncoderLayer` whose parameters are stacked
[num_layers, ...] and run under `jax.lax.scan` (`clue_jax.models.stacking`),
so compile time does not grow with depth; HF import/export maps layer i to
slice i.

Dropout: `cfg.dropout` is applied after the embeddings and after each
residual branch (HF's hidden_dropout_prob), only when a `dropout_key` is passed
to `__call__`; without one the model is deterministic (eval, scoring, tests).
No attention-probability dropout: the fast attention kernel has none.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from clue_jax import dataclass_config
from clue_jax.errors import UserInputError
from clue_jax.models import attention as attn
from clue_jax.models import layers, stacking

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Architecture of a BERT/ELECTRA encoder. Defaults give a tiny model."""

    vocab_size: int = 512
    hidden_size: int = 64
    embedding_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_len: int = 128  # learned absolute positions: the longest sequence accepted
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"  # encoder MLP and discriminator head (HF hidden_act)
    dropout: float = 0.0  # used only when a dropout_key is passed
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # recompute layer activations in the backward pass: none | full | dots

    def __post_init__(self):
        object.__setattr__(self, "remat", layers.remat_policy_name(self.remat, "encoder.remat"))
        for name in ("vocab_size", "hidden_size", "embedding_size", "num_layers", "num_heads",
                     "intermediate_size", "max_len", "type_vocab_size"):
            if int(getattr(self, name)) < 1:
                raise UserInputError(f"encoder.{name}={getattr(self, name)} must be a positive integer")
        if self.hidden_size % self.num_heads:
            raise UserInputError(
                f"encoder.hidden_size={self.hidden_size} is not divisible by encoder.num_heads={self.num_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise UserInputError(f"encoder.hidden_act={self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserInputError(f"encoder.dropout={self.dropout} must be in [0, 1)")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise UserInputError(f"encoder.{name}={getattr(self, name)!r} is not a dtype") from e

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weights_dtype(self):
        return jnp.dtype(self.param_dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "encoder") -> "EncoderConfig":
        return dataclass_config.from_dict(cls, values, where)


def generator_config(disc_cfg: EncoderConfig, width_fraction: float) -> EncoderConfig:
    """ELECTRA's generator: hidden, intermediate and heads scaled by `width_fraction`.

    Depth, vocabulary, embedding_size and positions stay the discriminator's
    so the two can share one `Embeddings` module (ELECTRA-small uses 1/4,
    base and large 1/3 and 1/4).
    """
    if not 0.0 < width_fraction <= 1.0:
        raise UserInputError(f"generator width_fraction={width_fraction} must be in (0, 1]")
    hidden = int(round(disc_cfg.hidden_size * width_fraction))
    heads = max(1, int(round(disc_cfg.num_heads * width_fraction)))
    inter = max(1, int(round(disc_cfg.intermediate_size * width_fraction)))
    if hidden < 1 or hidden % heads:
        raise UserInputError(
            f"generator width_fraction={width_fraction} gives hidden_size={hidden} and num_heads={heads} "
            f"from the discriminator's {disc_cfg.hidden_size}/{disc_cfg.num_heads}; pick another fraction"
        )
    return dataclasses.replace(disc_cfg, hidden_size=hidden, num_heads=heads, intermediate_size=inter)


def _kw(cfg: EncoderConfig, rngs: nnx.Rngs) -> dict:
    return dict(dtype=cfg.compute_dtype, param_dtype=cfg.weights_dtype, rngs=rngs)


def _linear(cfg: EncoderConfig, n_in: int, n_out: int, names: tuple, rngs: nnx.Rngs):
    return layers.linear(n_in, n_out, names, use_bias=True, **_kw(cfg, rngs))


def _norm(cfg: EncoderConfig, features: int, rngs: nnx.Rngs):
    return layers.layer_norm(features, eps=cfg.layer_norm_eps, **_kw(cfg, rngs))


def _split(key: jax.Array | None, n: int) -> list:
    """n independent dropout keys, or n Nones (deterministic)."""
    return [None] * n if key is None else list(jax.random.split(key, n))


def _drop(module: nnx.Dropout, x: jax.Array, key: jax.Array | None) -> jax.Array:
    return x if key is None else module(x, deterministic=False, rngs=key)


class Embeddings(nnx.Module):
    """Word + absolute position + token-type embeddings, then LayerNorm (HF ElectraEmbeddings)."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        kw = _kw(cfg, rngs)
        e = cfg.embedding_size
        self.max_len = cfg.max_len
        self.word_embeddings = layers.embed(cfg.vocab_size, e, ("vocab", "embed"), **kw)
        self.position_embeddings = layers.embed(cfg.max_len, e, ("pos", "embed"), **kw)
        self.token_type_embeddings = layers.embed(cfg.type_vocab_size, e, (None, "embed"), **kw)
        self.layer_norm = _norm(cfg, e, rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, input_ids, token_type_ids=None, dropout_key=None):
        t = input_ids.shape[1]
        if t > self.max_len:
            raise UserInputError(f"sequence length {t} exceeds the encoder's max_len={self.max_len}")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(jnp.arange(t))[None]
        return _drop(self.dropout, self.layer_norm(x), dropout_key)


class EncoderLayer(nnx.Module):
    """Post-LN BERT layer: x = LN(x + Attn(x)); x = LN(x + W2 act(W1 x))."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.query = _linear(cfg, h, h, ("embed", "heads"), rngs)
        self.key = _linear(cfg, h, h, ("embed", "heads"), rngs)
        self.value = _linear(cfg, h, h, ("embed", "heads"), rngs)
        self.attention_output = _linear(cfg, h, h, ("heads", "embed"), rngs)
        self.attention_norm = _norm(cfg, h, rngs)
        self.intermediate = _linear(cfg, h, cfg.intermediate_size, ("embed", "mlp"), rngs)
        self.output = _linear(cfg, cfg.intermediate_size, h, ("mlp", "embed"), rngs)
        self.output_norm = _norm(cfg, h, rngs)
        self.activation = ACTIVATIONS[cfg.hidden_act]
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x, allowed, dropout_key=None):
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = self.query(x).reshape(shape)
        k = self.key(x).reshape(shape)
        v = self.value(x).reshape(shape)
        a = attn.attend(q, k, v, allowed, scale=self.head_dim**-0.5).reshape(b, t, -1)
        k1, k2 = _split(dropout_key, 2)
        x = self.attention_norm(x + _drop(self.dropout, self.attention_output(a), k1))
        h = self.output(self.activation(self.intermediate(x)))
        return self.output_norm(x + _drop(self.dropout, h, k2))


class EncoderBody(nnx.Module):
    """Everything after the embeddings: optional embeddings_project, then the layers (stacked, scanned)."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings_project = (
            _linear(cfg, cfg.embedding_size, cfg.hidden_size, (None, "embed"), rngs)
            if cfg.embedding_size != cfg.hidden_size else None
        )
        # One EncoderLayer whose parameters are stacked [num_layers, ...], run under scan.
        self.layers = stacking.stack(lambda r: EncoderLayer(cfg, r), cfg.num_layers, rngs)
        self.remat = cfg.remat  # layers.set_remat changes it for training

    def __call__(self, embedded, attention_mask=None, dropout_key=None):
        """embedded [B, T, E] -> hidden [B, T, H]; attention_mask [B, T] (1 = real token)."""
        if attention_mask is None:
            attention_mask = jnp.ones(embedded.shape[:2], jnp.int32)
        allowed = attn.allowed_keys(attention_mask, causal=False)
        x = embedded if self.embeddings_project is None else self.embeddings_project(embedded)
        # layer l gets the l-th of split(dropout_key, L) (the keys the unrolled loop used); None: deterministic
        keys = None if dropout_key is None else jax.random.split(dropout_key, self.cfg.num_layers)
        x, _ = stacking.scan(self.layers, self.remat, lambda layer, x, key: (layer(x, allowed, key), None), x, keys)
        return x


class Encoder(nnx.Module):
    """HF ElectraModel: `Embeddings` + `EncoderBody`. Returns hidden states [B, T, H]."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs)
        self.body = EncoderBody(cfg, rngs)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, dropout_key=None):
        k1, k2 = _split(dropout_key, 2)
        return self.body(self.embeddings(input_ids, token_type_ids, k1), attention_mask, k2)


# ----------------------------------------------------------------------------- heads


class MaskedLMHead(nnx.Module):
    """Generator MLM head: dense(H->E) -> gelu -> LayerNorm -> tied word table + bias.

    HF's generator_predictions + generator_lm_head. The word table is passed in
    at call time (see the module docstring on sharing); logits are float32.
    """

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.dense = _linear(cfg, cfg.hidden_size, cfg.embedding_size, (None, "embed"), rngs)
        self.layer_norm = _norm(cfg, cfg.embedding_size, rngs)
        init = nnx.with_partitioning(nnx.initializers.zeros_init(), ("vocab",))
        self.bias = nnx.Param(init(rngs.params(), (cfg.vocab_size,), cfg.weights_dtype))

    def __call__(self, hidden, word_embeddings: nnx.Embed):
        h = self.layer_norm(ACTIVATIONS["gelu"](self.dense(hidden)))
        logits = word_embeddings.attend(h).astype(jnp.float32)
        return logits + self.bias[...].astype(jnp.float32)


class DiscriminatorHead(nnx.Module):
    """Replaced-token detection: dense -> act -> dense to one logit per token [B, T] (float32)."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.dense = _linear(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", "mlp"), rngs)
        self.dense_prediction = _linear(cfg, cfg.hidden_size, 1, ("mlp", None), rngs)
        self.activation = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, hidden):
        return self.dense_prediction(self.activation(self.dense(hidden)))[..., 0].astype(jnp.float32)


class SpanQAHead(nnx.Module):
    """Extractive QA: one dense to (start, end) logits, each [B, T] float32.

    SQuAD 2.0 "no answer" is the span (0, 0): the [CLS] position, so the
    training targets for unanswerable questions are start = end = 0.
    """

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.qa_outputs = _linear(cfg, cfg.hidden_size, 2, ("embed", None), rngs)

    def __call__(self, hidden):
        logits = self.qa_outputs(hidden).astype(jnp.float32)
        return logits[..., 0], logits[..., 1]


class ClassificationHead(nnx.Module):
    """ELECTRA's sequence head: [CLS] hidden -> dense -> gelu -> dense to num_labels (float32).

    num_labels == 1 is regression (STS-B); see `classification_loss`.
    """

    def __init__(self, cfg: EncoderConfig, num_labels: int, rngs: nnx.Rngs):
        if num_labels < 1:
            raise UserInputError(f"num_labels={num_labels} must be at least 1")
        self.dense = _linear(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", "mlp"), rngs)
        self.out_proj = _linear(cfg, cfg.hidden_size, num_labels, ("mlp", None), rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, hidden, dropout_key=None):
        k1, k2 = _split(dropout_key, 2)
        x = _drop(self.dropout, hidden[:, 0], k1)
        x = _drop(self.dropout, ACTIVATIONS["gelu"](self.dense(x)), k2)
        return self.out_proj(x).astype(jnp.float32)


# ----------------------------------------------------------------------------- models


class ElectraDiscriminator(nnx.Module):
    """HF ElectraForPreTraining: encoder + discriminator head -> RTD logits [B, T]."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Encoder(cfg, rngs)
        self.head = DiscriminatorHead(cfg, rngs)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, dropout_key=None):
        return self.head(self.encoder(input_ids, attention_mask, token_type_ids, dropout_key=dropout_key))


class ElectraGenerator(nnx.Module):
    """HF ElectraForMaskedLM: encoder + MLM head tied to its own word table -> logits [B, T, V]."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Encoder(cfg, rngs)
        self.head = MaskedLMHead(cfg, rngs)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, dropout_key=None):
        hidden = self.encoder(input_ids, attention_mask, token_type_ids, dropout_key=dropout_key)
        return self.head(hidden, self.encoder.embeddings.word_embeddings)


def _check_pair(disc_cfg: EncoderConfig, gen_cfg: EncoderConfig) -> None:
    shared = ("vocab_size", "embedding_size", "max_len", "type_vocab_size", "layer_norm_eps", "dtype", "param_dtype")
    for name in shared:
        if getattr(disc_cfg, name) != getattr(gen_cfg, name):
            raise UserInputError(
                f"generator {name}={getattr(gen_cfg, name)!r} differs from the discriminator's "
                f"{getattr(disc_cfg, name)!r}; they must match to share embeddings (use generator_config)"
            )


class ElectraPair(nnx.Module):
    """ELECTRA's generator and discriminator over ONE shared `Embeddings` module.

    The shared embeddings use the discriminator's dropout rate. Export either
    half as a standalone HF-shaped model with `discriminator_model()` /
    `generator_model()` (copies; the pair keeps its own weights).
    """

    def __init__(self, disc_cfg: EncoderConfig, gen_cfg: EncoderConfig, rngs: nnx.Rngs):
        _check_pair(disc_cfg, gen_cfg)
        self.disc_cfg = disc_cfg
        self.gen_cfg = gen_cfg
        self.embeddings = Embeddings(disc_cfg, rngs)
        self.generator = EncoderBody(gen_cfg, rngs)
        self.mlm_head = MaskedLMHead(gen_cfg, rngs)
        self.discriminator = EncoderBody(disc_cfg, rngs)
        self.disc_head = DiscriminatorHead(disc_cfg, rngs)

    def generator_logits(self, input_ids, attention_mask=None, token_type_ids=None, *, dropout_key=None):
        """MLM logits [B, T, V] float32."""
        k1, k2 = _split(dropout_key, 2)
        x = self.embeddings(input_ids, token_type_ids, k1)
        return self.mlm_head(self.generator(x, attention_mask, k2), self.embeddings.word_embeddings)

    def discriminator_logits(self, input_ids, attention_mask=None, token_type_ids=None, *, dropout_key=None):
        """Replaced-token logits [B, T] float32 (> 0: "replaced")."""
        k1, k2 = _split(dropout_key, 2)
        x = self.embeddings(input_ids, token_type_ids, k1)
        return self.disc_head(self.discriminator(x, attention_mask, k2))

    def discriminator_model(self) -> ElectraDiscriminator:
        """A standalone copy of the discriminator (for fine-tuning or HF export)."""
        model = nnx.eval_shape(lambda: ElectraDiscriminator(self.disc_cfg, nnx.Rngs(0)))
        model.encoder.embeddings = nnx.clone(self.embeddings)
        model.encoder.body = nnx.clone(self.discriminator)
        model.head = nnx.clone(self.disc_head)
        return model

    def generator_model(self) -> ElectraGenerator:
        """A standalone copy of the generator, with its own copy of the shared embeddings."""
        model = nnx.eval_shape(lambda: ElectraGenerator(self.gen_cfg, nnx.Rngs(0)))
        model.encoder.embeddings = nnx.clone(self.embeddings)
        model.encoder.body = nnx.clone(self.generator)
        model.head = nnx.clone(self.mlm_head)
        return model
