"""Received-attention scores against naive full-matrix references (own numpy softmax and PyTorch GPT-2)."""
import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clue_jax.clues import scoring
from clue_jax.errors import UserInputError
from clue_jax.models import config as mc
from clue_jax.models import layers, stacking
from clue_jax.models.causal_lm import CausalLM

T = 13
QUERY_BLOCK = 4  # smaller than T and does not divide it


def _mask():
    # lengths 13, 9, 5 right-padded; a left-padded row of length 8 and the same tokens right-padded
    m = np.zeros((5, T), np.int32)
    m[0, :] = 1
    m[1, :9] = 1
    m[2, :5] = 1
    m[3, T - 8:] = 1
    m[4, :8] = 1
    return m


def _ids(vocab, seed=0):
    ids = np.random.default_rng(seed).integers(1, vocab, size=(5, T)).astype(np.int32)
    ids[4] = np.roll(ids[3], -(T - 8))
    return ids


def _sharpen(model, factor=6.0):
    """Random init gives near-uniform attention; larger q/k make the check discriminating."""
    for path, proj in nnx.iter_modules(model):
        if path and path[-1] in ("q_proj", "k_proj"):  # the stacked kernels of every layer
            proj.kernel[...] = proj.kernel[...] * factor


def _layers(model):
    """The model's Blocks in layer order, unstacked (the scanned units' sublayers)."""
    return [block for unit in stacking.unstack(model.blocks) for block in unit.sublayers()]


@functools.lru_cache(maxsize=None)
def _model(flavour):
    """One tiny model per flavour, shared by the tests of this file (building and compiling cost most)."""
    small = dict(vocab_size=97, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=32)
    if flavour == "gpt2":
        cfg = mc.gpt2(**small)
    elif flavour == "llama":
        cfg = mc.llama(num_kv_heads=2, **small)
    else:
        cfg = mc.gemma2(num_kv_heads=2, sliding_window=3, attn_logit_softcap=1.5, query_pre_attn_scalar=16.0, **small)
    model = nnx.jit(lambda: CausalLM(cfg, rngs=nnx.Rngs(1)))()
    _sharpen(model)
    return model


@nnx.jit
def _projections(model, ids, mask):
    """Per layer the attention's q and k (after RoPE), running the plain forward in between."""
    cfg = model.cfg
    b, t = ids.shape
    positions = layers.positions_from_mask(mask)
    x = model._embed(ids, positions)
    out = []
    for block in _layers(model):
        a = block.attn
        h = block.input_norm(x)
        q = a.q_proj(h).reshape(b, t, cfg.num_heads, cfg.head_size)
        k = a.k_proj(h).reshape(b, t, cfg.kv_heads, cfg.head_size)
        if cfg.flavour != "gpt2":
            q = layers.apply_rope(q, positions, a.inv_freq[...])
            k = layers.apply_rope(k, positions, a.inv_freq[...])
        out.append((q, k))
        x, _ = block(x, positions, mask)
    return out


def _naive_attention(model, ids, mask):
    """Per-example mean attention matrix [B, T, T] (float64), from the layers' own projections.

    Softmax, causal/window/padding masks, soft-capping, GQA head mapping and
    the averaging are re-done here in numpy; rows of padded queries are 0.
    """
    cfg = model.cfg
    b, t = ids.shape
    n, kv, hd = cfg.num_heads, cfg.kv_heads, cfg.head_size
    total = np.zeros((b, t, t))
    real = np.asarray(mask) > 0
    qi, kj = np.arange(t)[:, None], np.arange(t)[None, :]
    for li, (q, k) in enumerate(_projections(model, jnp.asarray(ids), jnp.asarray(mask))):
        q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
        scale = (cfg.query_pre_attn_scalar or hd) ** -0.5 if cfg.flavour == "gemma2" else hd ** -0.5
        window = cfg.sliding_window if (cfg.sliding_window and li % 2 == 0) else 0
        for head in range(n):
            kh = head // (n // kv)
            logits = np.einsum("bqd,bkd->bqk", q[:, :, head], k[:, :, kh]) * scale
            if cfg.attn_logit_softcap:
                logits = np.tanh(logits / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
            ok = (kj <= qi)[None] & real[:, None, :]
            if window:
                ok = ok & ((qi - kj) < window)[None]
            logits = np.where(ok, logits, -np.inf)
            mx = np.max(logits, axis=-1, keepdims=True)
            mx = np.where(np.isfinite(mx), mx, 0.0)
            e = np.where(ok, np.exp(logits - mx), 0.0)
            z = e.sum(-1, keepdims=True)
            p = np.where(z > 0, e / np.where(z > 0, z, 1.0), 0.0)
            total += p * real[:, :, None]
    return total / (cfg.num_layers * n)


@nnx.jit
def _scores_and_rows(model, ids, mask, query_index):
    return (scoring.received_attention(model, ids, mask, query_block=QUERY_BLOCK),
            scoring.attention_from_query(model, ids, mask, query_index, query_block=QUERY_BLOCK))


def _naive_received(avg, mask):
    b, t, _ = avg.shape
    s = np.zeros((b, t))
    for e in range(b):
        real = np.flatnonzero(mask[e])
        for j in real:
            later = real[real >= j]
            s[e, j] = avg[e, later, j].sum() / len(later)
    return s


@pytest.mark.parametrize("flavour", ["gpt2", "llama", "gemma2"])
def test_received_attention_matches_naive(flavour):
    model = _model(flavour)
    mask = _mask()
    ids = _ids(model.cfg.vocab_size)
    qidx = np.asarray([12, 8, 3, 10, 5], np.int32)
    got, row = _scores_and_rows(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(qidx))
    got, row = np.asarray(got), np.asarray(row)
    avg = _naive_attention(model, ids, mask)
    want = _naive_received(avg, mask)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.all(got[mask == 0] == 0)
    # Every real query row sums to 1, so sum_j s_j * n_j = real length: catches a wrong normaliser.
    n = np.asarray(scoring.later_real_queries(jnp.asarray(mask)))
    np.testing.assert_allclose((got * n).sum(-1), mask.sum(-1), rtol=1e-5)
    # The scores are not uniform: the checks above are not vacuous.
    assert got[0].std() > 1e-3
    # Left padding (row 3) gives the same scores as right padding (row 4) for the same tokens.
    np.testing.assert_allclose(got[4, :8], got[3, T - 8:], atol=1e-5)
    # The analysis view: the mean attention row of a chosen query.
    np.testing.assert_allclose(row, avg[np.arange(5), qidx], atol=1e-5)


def test_scorer_sharded_bf16_and_corpus():
    model = _model("llama")
    mask = _mask()
    ids = _ids(model.cfg.vocab_size, seed=1)
    want = _naive_received(_naive_attention(model, ids, mask), mask)

    from clue_jax.parallel.mesh import make_mesh
    mesh = make_mesh((2, 2, 2))
    scorer = scoring.make_scorer(model, mesh=mesh, query_block=QUERY_BLOCK)
    got = scoring.score_corpus(scorer, ids, mask, batch_size=4)  # 5 rows: the last batch is padded
    assert got.shape == mask.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    out = scorer(ids[:4], mask[:4])
    assert out.sharding.spec[0] == ("data", "fsdp")
    assert not out.sharding.is_fully_replicated

    bf16 = scoring.make_scorer(model, dtype="bfloat16", query_block=QUERY_BLOCK)
    approx = np.asarray(bf16(ids, mask))
    assert np.abs(approx - want).max() < 0.05 * np.abs(want).max()
    assert not np.allclose(approx, want, atol=1e-6)  # it really ran in bf16
    assert model.blocks.attn.q_proj.kernel[...].dtype == jnp.float32  # the model is untouched

    with pytest.raises(UserInputError, match="max_len"):
        scorer(np.zeros((4, 40), np.int32))
    with pytest.raises(UserInputError, match="divisible"):
        scorer(ids[:3], mask[:3])
    with pytest.raises(UserInputError, match="attention_mask shape"):
        scoring.score_corpus(scorer, ids, mask[:, :5], batch_size=4)


def _copy_torch_gpt2(tmodel, cfg):
    """HF GPT2LMHeadModel -> CausalLM: Conv1D weights are [in, out], c_attn is q|k|v."""
    model = nnx.jit(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))()
    sd = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
    d = cfg.d_model

    def put(var, value, layer=None):  # layer: the slice of a stacked param
        value = jnp.asarray(value, jnp.float32)
        var[...] = value if layer is None else var[...].at[layer].set(value)

    put(model.embed_tokens.embedding, sd["transformer.wte.weight"])
    put(model.embed_positions.embedding, sd["transformer.wpe.weight"][: cfg.max_len])
    block = model.blocks
    for i in range(cfg.num_layers):
        p = f"transformer.h.{i}."
        put(block.input_norm.scale, sd[p + "ln_1.weight"], i)
        put(block.input_norm.bias, sd[p + "ln_1.bias"], i)
        w, bias = sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]
        for j, proj in enumerate((block.attn.q_proj, block.attn.k_proj, block.attn.v_proj)):
            put(proj.kernel, w[:, j * d:(j + 1) * d], i)
            put(proj.bias, bias[j * d:(j + 1) * d], i)
        put(block.attn.o_proj.kernel, sd[p + "attn.c_proj.weight"], i)
        put(block.attn.o_proj.bias, sd[p + "attn.c_proj.bias"], i)
        put(block.mlp_norm.scale, sd[p + "ln_2.weight"], i)
        put(block.mlp_norm.bias, sd[p + "ln_2.bias"], i)
        put(block.mlp.up_proj.kernel, sd[p + "mlp.c_fc.weight"], i)
        put(block.mlp.up_proj.bias, sd[p + "mlp.c_fc.bias"], i)
        put(block.mlp.down_proj.kernel, sd[p + "mlp.c_proj.weight"], i)
        put(block.mlp.down_proj.bias, sd[p + "mlp.c_proj.bias"], i)
    put(model.final_norm.scale, sd["transformer.ln_f.weight"])
    put(model.final_norm.bias, sd["transformer.ln_f.bias"])
    return model


@nnx.jit
def _scores_and_logits(model, ids, mask):
    return scoring.received_attention(model, ids, mask, QUERY_BLOCK), model(ids, mask)


def test_against_torch_gpt2_output_attentions():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    tcfg = transformers.GPT2Config(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                   bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    tmodel = transformers.GPT2LMHeadModel(tcfg).eval()
    with torch.no_grad():
        for name, p in tmodel.named_parameters():
            p.normal_(0.0, 0.3 if "attn.c_attn" in name else 0.1)
    cfg = mc.gpt2(vocab_size=101, d_model=32, num_layers=2, num_heads=4, mlp_dim=128, max_len=32)
    model = _copy_torch_gpt2(tmodel, cfg)

    mask = _mask()[:3]  # right padding only: HF GPT-2 positions ignore the mask
    ids = np.random.default_rng(2).integers(0, 101, size=mask.shape).astype(np.int64)
    with torch.no_grad():
        out = tmodel(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                     output_attentions=True)
    att = np.stack([a.numpy().astype(np.float64) for a in out.attentions])  # [L, B, N, T, T]
    avg = att.mean(axis=(0, 2))
    want = _naive_received(avg, mask)
    got, logits = _scores_and_logits(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    got, logits = np.asarray(got), np.asarray(logits)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got[0].std() > 1e-3
    real = mask > 0
    np.testing.assert_allclose(logits[real], out.logits.numpy()[real], atol=2e-4, rtol=1e-4)
