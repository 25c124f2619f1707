"""HF checkpoints: clue_jax's CausalLM against PyTorch transformers on tiny random models.

Each reference model gets random weights everywhere (biases and norms too, so
a wrong split, transpose or norm offset shows), is saved with
`save_pretrained`, and is run in float32 with eager attention on a batch whose
second row is right-padded.
"""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from clue_jax.errors import UserInputError
from clue_jax.models import hf
from clue_jax.models.layers import rope_inverse_frequencies
from clue_jax.parallel.mesh import make_mesh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, T = 100, 10
SMALL = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _hf_configs():
    t = transformers
    gqa = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return {
        "gpt2": t.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, **SMALL),
        "llama": t.LlamaConfig(**{**gqa, "num_hidden_layers": 3}, head_dim=8, rope_theta=10000.0, **SMALL),
        "llama3": t.LlamaConfig(
            **gqa, head_dim=16, rope_theta=10000.0, tie_word_embeddings=True, **SMALL,
            rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16},
        ),
        "gemma2": t.Gemma2Config(  # 4 layers: two scanned sliding/global pairs
            **{**gqa, "num_hidden_layers": 4}, head_dim=8, sliding_window=4, query_pre_attn_scalar=12, attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0, **SMALL,
        ),
    }


def _inputs():
    ids = np.random.RandomState(0).randint(3, VOCAB, (2, T))
    mask = np.ones((2, T), np.int32)
    mask[1, 7:] = 0  # right padding: HF's default position ids stay right
    return ids, mask


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """name -> (directory, torch logits [B,T,V], torch received-attention colsum [B,T])."""
    ids, mask = _inputs()
    out = {}
    for i, (name, config) in enumerate(_hf_configs().items()):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                is_scale = ("norm" in pname or "ln_" in pname) and pname.endswith("weight")
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if is_scale else 0.0))
        model.eval()
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        with torch.no_grad():
            res = model(torch.tensor(ids), attention_mask=torch.tensor(mask), output_attentions=True)
        att = sum(a.numpy() for a in res.attentions)  # [B, H, T, T], summed over layers
        colsum = np.einsum("bhqk,bq->bk", att, mask.astype(np.float32))  # over heads and real queries
        out[name] = (path, res.logits.numpy(), colsum)
    return out


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


@nnx.jit
def _colsum(model, ids, mask):
    return model.received_attention_sums(ids, mask, query_block=4)["colsum"]


def _logits(model, ids, mask):
    return np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))


def _assert_same_params(a, b):
    flat_a, flat_b = nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (p, x), (_, y) in zip(flat_a, flat_b):
        assert x.get_value().dtype == y.get_value().dtype, p
        np.testing.assert_array_equal(np.asarray(x.get_value()), np.asarray(y.get_value()), err_msg=str(p))


@pytest.mark.parametrize("name", ["gpt2", "llama", "llama3", "gemma2"])
def test_load_matches_torch_logits_and_attention(refs, name):
    path, ref_logits, ref_colsum = refs[name]
    ids, mask = _inputs()
    model, cfg = hf.load(path)
    real = mask.astype(bool)
    assert np.abs(ref_logits[real]).max() > 1.0  # weights are not near zero: the comparison means something
    np.testing.assert_allclose(_logits(model, ids, mask)[real], ref_logits[real], atol=1e-4, rtol=1e-5)
    colsum = np.asarray(_colsum(model, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(colsum[real], ref_colsum[real], atol=1e-4, rtol=1e-5)
    if name == "llama3":
        assert cfg.rope_scaling == (4.0, 1.0, 4.0, 16) and cfg.tie_embeddings
    if name == "gemma2":
        assert (cfg.sliding_window, cfg.attn_logit_softcap, cfg.query_pre_attn_scalar) == (4, 2.0, 12.0)


@pytest.mark.parametrize("name", ["llama3", "gemma2"])
def test_rope_scaling_and_sliding_window_change_the_logits(refs, name):
    """The feature under test really acts on this input (so the match above can fail)."""
    path, ref_logits, _ = refs[name]
    ids, mask = _inputs()
    model, cfg = hf.load(path)
    if name == "llama3":  # the plain RoPE table in place of LLaMA-3's scaled one, in every stacked layer
        inv_freq = model.blocks.attn.inv_freq
        inv_freq.set_value(jnp.broadcast_to(rope_inverse_frequencies(cfg.head_size, cfg.rope_theta), inv_freq.shape))
    else:  # the sliding layers of the scanned pairs attend globally
        model.blocks.sliding.attn.sliding_window = 0
    real = mask.astype(bool)
    assert np.abs(_logits(model, ids, mask)[real] - ref_logits[real]).max() > 1e-2


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma2"])
def test_save_then_transformers_from_pretrained(refs, tmp_path, name):
    path, ref_logits, _ = refs[name]
    ids, mask = _inputs()
    model, cfg = hf.load(path)
    hf.save(model, cfg, tmp_path)
    if name == "gpt2":  # re-fused c_attn, Conv1D layout, no lm_head (tied)
        keys = load_file(str(tmp_path / "model.safetensors"))
        assert keys["transformer.h.0.attn.c_attn.weight"].shape == (32, 96) and "lm_head.weight" not in keys
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    want = original.state_dict()
    for key, value in back.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=0, msg=key)
    with torch.no_grad():
        logits = back(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], ref_logits[real], atol=1e-5, rtol=1e-6)
    assert hf.config_from_hf(json.loads((tmp_path / "config.json").read_text())) == cfg


def test_sharded_load_equals_unsharded(refs):
    path, ref_logits, _ = refs["llama"]
    ids, mask = _inputs()
    plain, _ = hf.load(path)
    mesh = make_mesh((2, 2, 2))
    sharded, _ = hf.load(path, mesh=mesh)
    kernel = sharded.blocks.attn.q_proj.kernel[...]  # stacked [3 layers, 32, 32]; the layers axis is not split
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    assert {s.data.shape for s in kernel.addressable_shards} == {(3, 16, 16)}  # a quarter of each layer per device
    assert sharded.embed_tokens.embedding[...].sharding.spec == P("tensor", "fsdp")
    assert sharded.blocks.attn.k_proj.kernel[...].sharding.spec == P(None, "fsdp", "tensor")
    _assert_same_params(plain, sharded)
    real = mask.astype(bool)
    np.testing.assert_allclose(_logits(sharded, ids, mask)[real], ref_logits[real], atol=1e-4, rtol=1e-5)


def test_multi_file_checkpoints(refs, tmp_path):
    """HF's own shards + index, and ours, load to the same params; transformers reads ours."""
    path, ref_logits, _ = refs["gemma2"]
    ids, mask = _inputs()
    model, cfg = hf.load(path)
    original = transformers.AutoModelForCausalLM.from_pretrained(path)
    original.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    hf.save(model, cfg, tmp_path / "ours", max_shard_bytes=20_000)
    for d in ("hf", "ours"):
        assert (tmp_path / d / hf.INDEX_FILE).exists() and len(list((tmp_path / d).glob("*.safetensors"))) > 2
        again, _ = hf.load(tmp_path / d)
        _assert_same_params(again, model)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    with torch.no_grad():
        logits = back(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], ref_logits[real], atol=1e-5, rtol=1e-6)


def test_bfloat16_round_trip(refs, tmp_path):
    path, _, _ = refs["llama"]
    f32, _ = hf.load(path)
    model, cfg = hf.load(path, dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16" and model.lm_head.kernel[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(model.lm_head.kernel[...]), np.asarray(f32.lm_head.kernel[...].astype(jnp.bfloat16))
    )
    hf.save(model, cfg, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        assert f.get_slice("lm_head.weight").get_dtype() == "BF16"
    again, cfg2 = hf.load(tmp_path)
    assert cfg2 == cfg
    _assert_same_params(model, again)


def test_original_gpt2_names_without_prefix(refs, tmp_path):
    """The hub's original GPT-2 files name tensors h.0... and carry attn.bias mask buffers."""
    path, _, _ = refs["gpt2"]
    model, _ = hf.load(path)
    tensors = load_file(str(path / "model.safetensors"))
    renamed = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    renamed["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
    shutil.copy(path / "config.json", tmp_path / "config.json")
    save_file(renamed, str(tmp_path / "model.safetensors"))
    again, _ = hf.load(tmp_path)
    _assert_same_params(again, model)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def _rewrite_tensors(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_bad_checkpoints_raise_user_input_errors(refs, tmp_path):
    src = refs["llama"][0]

    d = _copy(src, tmp_path / "type")
    _edit_config(d, model_type="bert")
    with pytest.raises(UserInputError, match=r"config\.json.*model_type='bert'"):
        hf.load(d)

    d = _copy(src, tmp_path / "key")
    _edit_config(d, hidden_size=None)
    with pytest.raises(UserInputError, match=r"config\.json: missing required key 'hidden_size'"):
        hf.load(d)

    d = _copy(src, tmp_path / "rope")
    _edit_config(d, rope_parameters={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(UserInputError, match="rope_type='yarn'"):
        hf.load(d)

    d = _copy(src, tmp_path / "corrupt")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(UserInputError, match=r"corrupt/model\.safetensors: unreadable safetensors file"):
        hf.load(d)

    d = _copy(src, tmp_path / "missing")
    _rewrite_tensors(d, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(UserInputError, match=r"missing tensors \['model\.layers\.1\.mlp\.down_proj\.weight'\]"):
        hf.load(d)

    d = _copy(src, tmp_path / "extra")
    _rewrite_tensors(d, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}))
    with pytest.raises(UserInputError, match=r"no place for.*q_proj\.bias"):
        hf.load(d)

    d = _copy(src, tmp_path / "shape")
    _rewrite_tensors(d, lambda t: t.update({"model.norm.weight": np.zeros(31, np.float32)}))
    with pytest.raises(UserInputError, match=r"model\.norm\.weight has shape \[31\], expected \[32\]"):
        hf.load(d)

    with pytest.raises(UserInputError, match="config.json: not found"):
        hf.load(tmp_path / "nowhere")


def test_load_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[EOS]": 1, "Anna": 2, "was": 3, "born": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(
        tmp_path
    )
    loaded = hf.load_tokenizer(tmp_path)
    assert loaded("Anna was born")["input_ids"] == [2, 3, 4]
    assert loaded.eos_token_id == 1 and loaded.pad_token_id == 1  # no pad in the files: EOS pads
    with pytest.raises(UserInputError, match="tokenizer"):
        hf.load_tokenizer(tmp_path / "empty")


# transformers-4 style config.json files (rope_theta / rope_scaling, torch_dtype), as published for
# LLaMA-3.1-8B and Gemma-2-2B.
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
}
GEMMA2_2B = {
    "architectures": ["Gemma2ForCausalLM"], "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
    "head_dim": 256, "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304,
    "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
    "num_hidden_layers": 26, "num_key_value_heads": 4, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32", "vocab_size": 256000,
}


def test_config_conversions_older_format_and_round_trip():
    llama = hf.config_from_hf(LLAMA31_8B)
    assert (llama.flavour, llama.num_kv_heads, llama.head_size, llama.mlp_dim, llama.param_dtype) == (
        "llama", 8, 128, 14336, "bfloat16")
    assert llama.rope_theta == 500000.0 and llama.rope_scaling == (8.0, 1.0, 4.0, 8192)
    gemma = hf.config_from_hf(GEMMA2_2B)
    assert (gemma.sliding_window, gemma.attn_logit_softcap, gemma.final_logit_softcap) == (4096, 50.0, 30.0)
    assert (gemma.head_size, gemma.query_pre_attn_scalar, gemma.tie_embeddings) == (256, 256.0, True)
    for cfg in (llama, gemma):
        as_hf = hf.config_to_hf(cfg)
        assert hf.config_from_hf(as_hf) == cfg
        parsed = transformers.AutoConfig.for_model(**as_hf)  # transformers accepts what we write
        assert parsed.num_key_value_heads == cfg.num_kv_heads and parsed.head_dim == cfg.head_size
    assert transformers.AutoConfig.for_model(**hf.config_to_hf(llama)).rope_parameters["factor"] == 8.0
    with pytest.raises(UserInputError, match=r"/x/config\.json: hidden_size='big' is not a number"):
        hf.config_from_hf({**LLAMA31_8B, "hidden_size": "big"}, where="/x/config.json")
    with pytest.raises(UserInputError, match=r"config\.json: hidden_act='relu' is not supported"):
        hf.config_from_hf({**LLAMA31_8B, "hidden_act": "relu"})
