"""train.precision='mixed': float32 master weights and AdamW moments, bfloat16 compute (clue_jax.models.precision)."""
import dataclasses
import json

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clue_jax import export
from clue_jax.configs import get_config
from clue_jax.data.batching import ArrayBatchSource
from clue_jax.data.tokenizer import train_bpe_tokenizer
from clue_jax.errors import UserInputError
from clue_jax.models import config as model_config
from clue_jax.models import factory, hf, precision
from clue_jax.pipelines import common, validate
from clue_jax.pipelines.stages import Stages
from clue_jax.parallel import mesh as mesh_lib
from clue_jax.train import defaults, loop, objectives

VOCAB = 64
BF16_CKPT = model_config.llama(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                               max_len=32, dtype="bfloat16", param_dtype="bfloat16")


def _mesh():
    return mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])


def _data(rows=16, t=12):
    ids = np.random.default_rng(0).integers(0, VOCAB, (rows, t)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _float_dtypes(tree) -> set[str]:
    return {jnp.dtype(x.dtype).name for x in jax.tree.leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.fixture(scope="module")
def bf16_checkpoints(tmp_path_factory):
    """The same bf16 model as an HF directory and as a clue_jax stage model."""
    root = tmp_path_factory.mktemp("bf16")
    model = factory.create(BF16_CKPT, 0, _mesh())
    hf.save(model, BF16_CKPT, root / "hf")
    factory.save_params(model, BF16_CKPT, str(root / "orbax"))
    return {"hf": str(root / "hf"), "orbax": str(root / "orbax")}


def _trainer(model, tmp_path, name, **train):
    tcfg = defaults.train_config(**{"steps": 3, "batch_size": 4, "log_every": 1, "checkpoint_every": 100, **train})
    return loop.Trainer(model, objectives.causal_lm, tcfg, _mesh(), str(tmp_path / name))


@pytest.mark.parametrize("kind", ["hf", "orbax"])
def test_mixed_loads_float32_masters_and_moments_and_computes_in_bf16(bf16_checkpoints, tmp_path, kind):
    model, cfg = factory.load_params(bf16_checkpoints[kind], _mesh(), precision="mixed")
    assert (cfg.param_dtype, cfg.dtype) == ("float32", "bfloat16")
    assert _float_dtypes(nnx.state(model, nnx.Param)) == {"float32"}
    same, _ = factory.load_params(bf16_checkpoints[kind], _mesh())  # "checkpoint": as today, all bf16
    assert _float_dtypes(nnx.state(same, nnx.Param)) == {"bfloat16"}
    # Same weights: bf16 -> float32 is exact.
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(same, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(np.float32))

    trainer = _trainer(model, tmp_path, kind, precision="mixed")
    assert _float_dtypes(trainer.state["opt_state"]) == {"float32"}  # AdamW mu and nu follow the masters

    # Every matmul of the train step's forward and backward runs in bf16: bf16 operands, or (attention's backward)
    # float32 operands under a BF16_BF16_F32 precision; the hidden states are bf16 up to the float32 logits.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = {k: jnp.asarray(v[:2]) for k, v in _data().items()}
    loss = lambda p: objectives.causal_lm(nnx.merge(graphdef, p, rest), batch, None)[0]
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
    dots = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert len(dots) > 20 and all(_bf16_matmul(e) for e in dots)
    assert sum({v.aval.dtype.name for v in e.invars} == {"bfloat16"} for e in dots) > len(dots) // 2
    assert _float_dtypes(jax.grad(loss)(params)) == {"float32"}  # gradients land on the float32 masters
    assert model.hidden_states(batch["input_ids"]).dtype == jnp.bfloat16


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _equations(sub)


def _bf16_matmul(eqn) -> bool:
    return {v.aval.dtype.name for v in eqn.invars} == {"bfloat16"} or "BF16_BF16" in str(eqn.params["precision"])


def test_models_built_from_scratch_get_float32_params_and_bf16_compute():
    cfg = precision.model_config(model_config.llama(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=4), "mixed")
    model = factory.create(cfg, 0, _mesh())
    assert _float_dtypes(nnx.state(model, nnx.Param)) == {"float32"} and cfg.dtype == "bfloat16"
    assert precision.model_config(cfg, "checkpoint") is cfg


def _changed_fraction(before, after) -> float:
    pairs = list(zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    changed = sum(int(np.sum(np.asarray(a, np.float32) != np.asarray(b, np.float32))) for a, b in pairs)
    return changed / sum(a.size for a, _ in pairs)


def test_small_learning_rate_updates_round_away_in_bf16_masters_but_not_in_float32(bf16_checkpoints, tmp_path):
    """Adam moves each weight by about lr; below half a bf16 ulp (|w| * 2**-9) the update rounds to no change."""
    data = ArrayBatchSource(_data(), batch_size=4, seed=0)
    small_lr = dict(steps=3, lr=1e-6, schedule="constant", warmup_steps=0, weight_decay=0.0)
    moved = {}
    for name in ("checkpoint", "mixed"):
        model, _ = factory.load_params(bf16_checkpoints["hf"], _mesh(), precision=name)
        before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
        result = _trainer(model, tmp_path, name, precision=name, **small_lr).run(data)
        moved[name] = _changed_fraction(before, nnx.state(result.model, nnx.Param))
    assert moved["checkpoint"] < 0.05, moved  # bf16 masters: almost every update is lost (|w| > 5e-4)
    assert moved["mixed"] > 0.9, moved


def test_mixed_losses_track_an_all_float32_run(tmp_path):
    f32 = dataclasses.replace(BF16_CKPT, dtype="float32", param_dtype="float32")
    losses = {}
    for name, cfg in (("float32", f32), ("mixed", precision.model_config(f32, "mixed"))):
        trainer = _trainer(factory.create(cfg, 0, _mesh()), tmp_path, name, steps=6, lr=3e-3, warmup_steps=0,
                           precision="checkpoint" if name == "float32" else "mixed")
        trainer.run(ArrayBatchSource(_data(), batch_size=4, seed=0))
        with open(tmp_path / name / "metrics.jsonl") as f:
            losses[name] = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert len(losses["mixed"]) == 6
    # bf16 compute: about 3 significant digits per matmul; the runs must not drift apart over the steps.
    np.testing.assert_allclose(losses["mixed"], losses["float32"], rtol=2e-2)
    assert losses["mixed"] != losses["float32"]  # and the compute really was bf16


def test_trainer_refuses_a_model_not_loaded_for_mixed(bf16_checkpoints, tmp_path):
    model, _ = factory.load_params(bf16_checkpoints["orbax"], _mesh())
    with pytest.raises(ValueError, match="precision='mixed' but the model computes in bfloat16|is bfloat16"):
        _trainer(model, tmp_path, "x", precision="mixed")
    f32 = factory.create(dataclasses.replace(BF16_CKPT, dtype="float32", param_dtype="float32"), 0, _mesh())
    with pytest.raises(ValueError, match="the model computes in float32"):
        _trainer(f32, tmp_path, "y", precision="mixed")
    with pytest.raises(UserInputError, match=r"^train.precision='half' is not one of"):
        _trainer(f32, tmp_path, "z", precision="half")


def _one_line_error(config) -> str:
    with pytest.raises(UserInputError) as err:
        validate.check_config(config)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_validation_one_liners():
    config = get_config("quickstart")
    config.cpt.precision, config.lora.rank = "mixed", 16
    assert _one_line_error(config).startswith("--config.cpt.precision='mixed' is for full fine-tuning, but lora.rank=16")
    config.lora.rank = 0
    validate.check_config(config)  # full fine-tuning with mixed precision is fine
    config.pretrain.precision = "bf16"
    assert "--config.pretrain.precision='bf16': must be one of checkpoint, mixed" in _one_line_error(config)
    mcl = get_config("mcl_tiny")
    mcl.finetune.precision = "mixed"
    assert "not supported by the MCL pipeline" in _one_line_error(mcl)


def test_a_mixed_stage_saves_float32_and_export_writes_it_or_the_asked_dtype(bf16_checkpoints, tmp_path):
    stages = Stages(str(tmp_path))
    texts = ["Ada Lovelace was born in London in 1815.", "Alan Turing studied at Cambridge."] * 10
    stages.run("tokenizer", {"t": 1}, lambda d: {"path": d, "vocab_size": len(train_bpe_tokenizer(texts, 300, d))})

    def train(stage_dir):
        model, cfg = factory.load_params(bf16_checkpoints["hf"], _mesh(), precision="mixed")
        tcfg = defaults.train_config(steps=1, batch_size=4, log_every=1, checkpoint_every=100, precision="mixed")
        return common.train_model(stage_dir, model, cfg, ArrayBatchSource(_data(), 4, seed=0), tcfg, _mesh())

    stages.run("cpt_mixed", {"s": 1}, train)
    saved, cfg = factory.load_params(str(tmp_path / "stages" / "cpt_mixed" / "model"), _mesh())
    assert (cfg.param_dtype, cfg.dtype) == ("float32", "bfloat16")
    assert _float_dtypes(nnx.state(saved, nnx.Param)) == {"float32"}
    for dtype, expected in (("", "F32"), ("bfloat16", "BF16")):
        out = tmp_path / f"hf_{dtype or 'own'}"
        assert export.main(["--workdir", str(tmp_path), "--stage", "cpt_mixed", "--out", str(out)]
                           + (["--dtype", dtype] if dtype else [])) == 0
        header = _safetensors_header(out / hf.SINGLE_FILE)
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {expected}
        assert json.loads((out / "config.json").read_text())["dtype"] == (dtype or "float32")


def _safetensors_header(path) -> dict:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size))
