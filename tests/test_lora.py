"""LoRA: only the adapters train, the base stays bit-identical, merging is exact."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from clue_jax.errors import UserInputError
from clue_jax.models import hf, lora, stacking
from clue_jax.models.causal_lm import CausalLM
from clue_jax.models.config import gpt2, llama
from clue_jax.parallel.mesh import make_mesh
from clue_jax.parallel.rules import state_shardings

RANK, ALPHA = 4, 8.0
CFG = llama(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=64)


def _batch():
    ids = jax.random.randint(jax.random.key(1), (4, 12), 0, CFG.vocab_size)
    return ids, jnp.ones_like(ids)


def _loss(model, ids, mask):
    logits = model(ids, mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


@nnx.jit
def _train_step(model, optimizer, ids, mask):
    grad_fn = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, lora.trainable_filter(True)))
    loss, grads = grad_fn(model, ids, mask)
    optimizer.update(model, grads)
    return loss, grads


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


def _frozen(model):
    """Every non-adapter variable, copied to host."""
    state = nnx.state(model, nnx.Not(nnx.LoRAParam))
    return {p: np.array(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _adapters(model):
    return {p: np.array(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}


@pytest.fixture(scope="module")
def trained():
    """A tiny LLaMA with rank-4 adapters on every projection, after 6 Adam steps on the adapters."""
    model = CausalLM(CFG, rngs=nnx.Rngs(0))
    ids, mask = _batch()
    base_logits = np.asarray(_forward(model, ids, mask))
    lora.apply_lora(model, RANK, ALPHA, lora.PROJECTIONS, nnx.Rngs(1))
    start_logits = np.asarray(_forward(model, ids, mask))
    frozen, adapters = _frozen(model), _adapters(model)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=lora.trainable_filter(True))
    losses, grads = [], None
    for _ in range(6):
        loss, grads = _train_step(model, optimizer, ids, mask)
        losses.append(float(loss))
    return dict(model=model, base_logits=base_logits, start_logits=start_logits, frozen=frozen,
                adapters=adapters, losses=losses, grads=grads)


def test_adapters_start_as_identity(trained):
    np.testing.assert_array_equal(trained["start_logits"], trained["base_logits"])
    zero_b = [v for p, v in trained["adapters"].items() if p[-1] == "lora_b"]
    assert len(zero_b) == CFG.num_layers * 7 and all((b == 0).all() for b in zero_b)


def test_only_adapters_train_and_loss_falls(trained):
    model, losses = trained["model"], trained["losses"]
    grad_leaves = nnx.to_flat_state(trained["grads"])
    assert grad_leaves and all(p[-1] in ("lora_a", "lora_b") for p, _ in grad_leaves)
    after = _frozen(model)
    assert after.keys() == trained["frozen"].keys()
    for p, value in trained["frozen"].items():
        np.testing.assert_array_equal(after[p], value, err_msg=str(p))  # bit-identical base
    adapters = _adapters(model)
    for p, value in trained["adapters"].items():
        assert not np.array_equal(adapters[p], value), p
    assert losses[-1] < losses[0] - 0.05, losses


def test_merge_folds_adapters_exactly(trained, tmp_path):
    model = trained["model"]
    ids, mask = _batch()
    adapted = np.asarray(_forward(model, ids, mask))
    expected = {}
    for path, m in nnx.iter_modules(model):
        if isinstance(m, lora.LoRALinear):
            a, b = m.lora_a[...], m.lora_b[...]
            w = m.base_module.kernel[...]
            delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
            expected[path] = np.asarray(w + (ALPHA / RANK) * delta)
    assert len(expected) == CFG.num_layers * 7
    lora.merge_lora(model)
    assert not lora.has_lora(model) and not nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    for path, kernel in expected.items():
        linear = model
        for key in path:
            linear = linear[key] if isinstance(key, int) else getattr(linear, key)
        assert type(linear) is nnx.Linear
        np.testing.assert_array_equal(np.asarray(linear.kernel[...]), kernel, err_msg=str(path))
    np.testing.assert_allclose(np.asarray(_forward(model, ids, mask)), adapted, atol=1e-5, rtol=0)
    # A merged model is a plain CausalLM again: same structure, exportable.
    plain = nnx.eval_shape(lambda: CausalLM(CFG, rngs=nnx.Rngs(0)))
    assert [p for p, _ in nnx.to_flat_state(nnx.state(plain))] == [p for p, _ in nnx.to_flat_state(nnx.state(model))]
    hf.save(model, CFG, tmp_path)
    again, _ = hf.load(tmp_path)
    np.testing.assert_array_equal(np.asarray(again.blocks.mlp.down_proj.kernel[...]),
                                  np.asarray(model.blocks.mlp.down_proj.kernel[...]))


def test_targets_scale_and_sharding_names():
    cfg = gpt2(vocab_size=64, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=16)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    lora.apply_lora(model, RANK, ALPHA, ("q_proj", "v_proj", "gate_proj"), nnx.Rngs(1))  # GPT-2 has no gate_proj
    wrapped = sorted(p for p, m in nnx.iter_modules(model) if isinstance(m, lora.LoRALinear))
    assert wrapped == [("blocks", "attn", n) for n in ("q_proj", "v_proj")]  # each over the 2 stacked layers
    stacked = model.blocks.attn.q_proj
    assert stacked.lora_a.shape == (2, 32, RANK) and stacked.lora_b.shape == (2, RANK, 32)
    assert stacked.lora_a[...].dtype == jnp.float32
    assert not np.allclose(np.asarray(stacked.lora_a[0]), np.asarray(stacked.lora_a[1]))  # each layer its own init
    q = stacking.unstack(model.blocks)[0].attn.q_proj  # layer 0's adapters, as an unstacked module
    assert q.scale == ALPHA / RANK and q.lora_a.shape == (32, RANK) and q.lora_b.shape == (RANK, 32)
    # With B non-zero the output is base + (alpha / r) x A B.
    q.lora_b.set_value(jax.random.normal(jax.random.key(2), (RANK, 32)))
    x = jax.random.normal(jax.random.key(3), (3, 32))
    want = q.base_module(x) + (ALPHA / RANK) * (x @ q.lora_a[...] @ q.lora_b[...])
    np.testing.assert_allclose(np.asarray(q(x)), np.asarray(want), atol=1e-5, rtol=1e-5)
    shardings = state_shardings(nnx.state(model), make_mesh((2, 2, 2)))
    q_sh = shardings["blocks"]["attn"]["q_proj"]
    assert q_sh["lora_a"].get_value().spec == P(None, "fsdp", None)
    assert q_sh["lora_b"].get_value().spec == P(None, None, "tensor")
    assert lora.trainable_filter(False) is nnx.Param

    with pytest.raises(ValueError, match="already has LoRA"):
        lora.apply_lora(model, RANK, ALPHA, ("q_proj",), nnx.Rngs(1))
    with pytest.raises(UserInputError, match=r"unknown projection\(s\) \['qproj'\]"):
        lora.apply_lora(CausalLM(cfg, rngs=nnx.Rngs(0)), RANK, ALPHA, ("qproj",), nnx.Rngs(1))
    with pytest.raises(UserInputError, match="no such nnx.Linear"):
        lora.apply_lora(CausalLM(cfg, rngs=nnx.Rngs(0)), RANK, ALPHA, ("gate_proj",), nnx.Rngs(1))


def test_a_lora_stage_saves_only_its_adapters_and_reads_back_merged(tmp_path):
    """What a LoRA cpt stage saves is its adapters (bytes and names); reading the stage's model, and exporting
    it, give the merged weights of base + adapters."""
    import os

    from clue_jax import export
    from clue_jax.models import factory
    from clue_jax.pipelines.stages import Stages
    from clue_jax.models.store import saved_tree

    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    cfg = llama(vocab_size=300, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=32)
    base_dir = str(tmp_path / "base")
    factory.save_params(factory.create(cfg, 0, mesh), cfg, base_dir)
    model, _ = factory.load_params(base_dir, mesh)
    lora.apply_lora(model, 4, 8.0, rngs=nnx.Rngs(1))
    adapters = nnx.state(model, nnx.LoRAParam)
    trained = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype), adapters)
    nnx.update(model, trained)  # B no longer zero: the merge changes the weights

    workdir = str(tmp_path / "run")
    stage_model = os.path.join(workdir, "stages", "cpt_s", "model")
    stages = Stages(workdir)
    save = lambda d: lora.save_adapters(model, cfg, stage_model, base_dir=base_dir, rank=4, alpha=8.0,
                                        targets=lora.PROJECTIONS) or {"model_dir": os.path.relpath(stage_model, workdir)}
    stages.run("cpt_s", {}, save)
    saved = jax.tree.leaves_with_path(saved_tree(os.path.join(stage_model, "params")))
    names = [{str(getattr(k, "key", k)) for k in path} for path, _ in saved]
    assert saved and all(len(n & {"lora_a", "lora_b"}) == 1 for n in names)  # adapters, nothing else
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(trained))
    assert sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for _, m in saved) == adapter_bytes
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(factory.load_params(base_dir, mesh)[0], nnx.Param)))
    assert adapter_bytes < base_bytes / 2

    merged = nnx.state(lora.merge_lora(model), nnx.Param)
    loaded, loaded_cfg = factory.load_params(stage_model, mesh)
    assert loaded_cfg == cfg and not lora.has_lora(loaded)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), merged,
                 nnx.state(loaded, nnx.Param))

    from clue_jax.data.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(["a small tokenizer for a small model"] * 5, 300, tmp_path / "tok")
    stages.run("tokenizer", {}, lambda d: {"path": str(tmp_path / "tok")})
    exported = nnx.state(hf.load(export.export(workdir, "cpt_s", str(tmp_path / "hf"), None))[0], nnx.Param)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), merged, exported)
