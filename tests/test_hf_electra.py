"""HF ELECTRA import/export against PyTorch transformers (tiny random models, float32, eval mode)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from clue_jax.errors import UserInputError  # noqa: E402
from clue_jax.models import encoder as E  # noqa: E402
from clue_jax.models import hf_electra as H  # noqa: E402
from clue_jax.parallel.mesh import make_mesh  # noqa: E402

HF_CONFIG = dict(
    vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
    intermediate_size=64, max_position_embeddings=32,
)
CLASSES = {"discriminator": "ElectraForPreTraining", "generator": "ElectraForMaskedLM", "encoder": "ElectraModel"}


def _randomize(model, seed):
    """HF init leaves biases 0 and LayerNorms 1/0; random values make every tensor's mapping matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            p.copy_(noise + (1.0 if "LayerNorm.weight" in name else 0.0))


def _inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, HF_CONFIG["vocab_size"], (2, 10))
    mask = np.ones((2, 10), np.int64)
    mask[1, 6:] = 0  # right padding in row 1
    types = np.zeros((2, 10), np.int64)
    types[:, 5:] = 1
    return ids, mask, types


def _torch_out(model, kind, ids, mask, types):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))
    return (out.last_hidden_state if kind == "encoder" else out.logits).numpy()


def _jax_out(module, ids, mask, types):
    return np.asarray(module(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)))


def _load_torch(kind, path):
    return getattr(transformers, CLASSES[kind]).from_pretrained(path).eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Saved tiny random discriminator and generator, with their PyTorch outputs."""
    root = tmp_path_factory.mktemp("electra")
    torch.manual_seed(0)
    config = transformers.ElectraConfig(**HF_CONFIG)
    ids, mask, types = _inputs()
    out = {}
    for i, kind in enumerate(("discriminator", "generator")):
        model = getattr(transformers, CLASSES[kind])(config).eval()
        _randomize(model, seed=i)
        model.save_pretrained(root / kind)
        out[kind] = _torch_out(model, kind, ids, mask, types)
    return root, out


def _close_on_real(a, b, mask, atol):
    real = mask.astype(bool)
    np.testing.assert_allclose(a[real], b[real], atol=atol, rtol=0)


@pytest.mark.parametrize("kind", ["discriminator", "generator"])
def test_logits_match_pytorch_and_survive_save(ckpts, kind, tmp_path):
    root, ref = ckpts
    ids, mask, types = _inputs()
    module, cfg = H.load_electra(root / kind, kind)
    assert (cfg.hidden_size, cfg.embedding_size, cfg.num_layers) == (32, 16, 3)  # stacked, scanned layers
    assert np.abs(ref[kind]).max() > 1.0  # the random weights give non-trivial logits
    ours = _jax_out(module, ids, mask, types)
    assert ours.shape == ref[kind].shape
    _close_on_real(ours, ref[kind], mask, atol=1e-4)

    H.save_electra(module, cfg, tmp_path / "out", kind)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["architectures"] == [CLASSES[kind]]
    back = _torch_out(_load_torch(kind, tmp_path / "out"), kind, ids, mask, types)
    _close_on_real(back, ref[kind], mask, atol=1e-5)


def test_encoder_from_pretraining_checkpoint_round_trips(ckpts, tmp_path):
    root, _ = ckpts
    ids, mask, types = _inputs()
    enc, cfg = H.load_electra(root / "discriminator", "encoder")
    assert isinstance(enc, E.Encoder)
    ref = _torch_out(_load_torch("encoder", root / "discriminator"), "encoder", ids, mask, types)
    ours = _jax_out(enc, ids, mask, types)
    _close_on_real(ours, ref, mask, atol=1e-4)
    H.save_electra(enc, cfg, tmp_path / "enc", "encoder")
    assert "embeddings.word_embeddings.weight" in load_file(tmp_path / "enc" / "model.safetensors")
    again, _ = H.load_electra(tmp_path / "enc", "encoder")  # no "electra." prefix this time
    np.testing.assert_array_equal(_jax_out(again, ids, mask, types), ours)


def test_load_on_mesh_shards_parameters(ckpts):
    root, ref = ckpts
    ids, mask, types = _inputs()
    mesh = make_mesh((1, 2, 4))
    module, _ = H.load_electra(root / "discriminator", "discriminator", mesh=mesh)
    kernel = module.encoder.body.layers.intermediate.kernel[...]  # [layers, embed, mlp]: no mesh axis for layers
    assert kernel.shape[0] == 3 and kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert len(kernel.addressable_shards) == 8
    hf = load_file(root / "discriminator" / "model.safetensors")
    for i in range(3):  # HF layer i is slice i of the stack (transposed: torch stores [out, in])
        np.testing.assert_array_equal(np.asarray(kernel[i]), hf[f"electra.encoder.layer.{i}.intermediate.dense.weight"].T)
    _close_on_real(_jax_out(module, ids, mask, types), ref["discriminator"], mask, atol=1e-4)


def test_pair_halves_export_to_transformers(tmp_path):
    disc_cfg = H.config_from_hf(transformers.ElectraConfig(**HF_CONFIG))  # same shapes: warm op caches
    pair = E.ElectraPair(disc_cfg, E.generator_config(disc_cfg, 0.5), nnx.Rngs(0))
    ids, mask, types = _inputs()
    j = (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    for kind, ours in (("discriminator", pair.discriminator_logits(*j)), ("generator", pair.generator_logits(*j))):
        cfg = pair.gen_cfg if kind == "generator" else pair.disc_cfg
        H.save_electra(pair, cfg, tmp_path / kind, kind)
        theirs = _torch_out(_load_torch(kind, tmp_path / kind), kind, ids, mask, types)
        _close_on_real(np.asarray(ours), theirs, mask, atol=1e-4)


def test_bad_checkpoints_raise_user_errors(ckpts, tmp_path):
    root, _ = ckpts
    with pytest.raises(UserInputError, match="kind"):
        H.load_electra(root / "discriminator", "tagger")
    with pytest.raises(UserInputError, match="config.json"):
        H.load_electra(tmp_path, "discriminator")

    bad = tmp_path / "missing"
    shutil.copytree(root / "discriminator", bad)
    tensors = load_file(bad / "model.safetensors")
    del tensors["electra.encoder.layer.1.intermediate.dense.bias"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserInputError, match=r"electra\.encoder\.layer\.1\.intermediate\.dense\.bias"):
        H.load_electra(bad, "discriminator")

    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserInputError, match="model.safetensors"):
        H.load_electra(bad, "discriminator")

    wrong = tmp_path / "wrong"
    shutil.copytree(root / "discriminator", wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["intermediate_size"] = 48
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError, match=r"layer\.0\.intermediate\.dense.*\(48,\)"):
        H.load_electra(wrong, "discriminator")
    (wrong / "config.json").write_text("{not json")
    with pytest.raises(UserInputError, match="config.json"):
        H.load_electra(wrong, "discriminator")
