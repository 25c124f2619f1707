"""MCL objective: each course's losses on tiny fixed inputs, the correction losses as docs/methods.md ("MCL") has them,
static == dynamic settings, and a few Trainer steps lower the ELECTRA loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clue_jax.errors import UserInputError
from clue_jax.mcl import correction
from clue_jax.mcl import objective as O
from clue_jax.models.encoder import ElectraPair, EncoderConfig, generator_config
from clue_jax.models.encoder_losses import mlm_loss, rtd_loss

BOS, EOS, PAD, MASK = 0, 1, 2, 3
CFG = EncoderConfig(vocab_size=40, hidden_size=16, embedding_size=16, num_layers=1, num_heads=2,
                    intermediate_size=32, max_len=16)
OBJ = O.ObjectiveConfig(courses=O.COURSES, corrections=O.CORRECTIONS, mask_id=MASK, protected_ids=(BOS, EOS),
                        banned_ids=(BOS, EOS, PAD, MASK), dropout=False, mask_rate=0.3, swap_rate=0.3,
                        insert_rate=0.2)


def _batch():
    ids = np.random.default_rng(0).integers(4, 40, (4, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    ids[:, 0] = BOS
    ids[0, 11] = EOS
    ids[1, 8], ids[1, 9:], mask[1, 9:] = EOS, PAD, 0  # a padded row
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}


@pytest.fixture(scope="module")
def pair():
    return ElectraPair(CFG, generator_config(CFG, 0.5), nnx.Rngs(0))


@pytest.fixture(scope="module")
def outputs(pair):
    """Every course on the fixed batch, eagerly, with all four correction losses on."""
    batch = _batch()
    return batch, {c: O.run_course(pair, batch, jax.random.key(3), OBJ, c) for c in O.COURSES}


def test_config_errors():
    with pytest.raises(UserInputError, match="valid courses"):
        O.ObjectiveConfig(courses=("rtd", "xtd"))
    with pytest.raises(UserInputError, match="course 'std' is not"):
        O.ObjectiveConfig(courses=("rtd",), corrections=("re_std_gen",))
    with pytest.raises(UserInputError, match="sampling"):
        O.ObjectiveConfig(sampling="sometimes")
    with pytest.raises(UserInputError, match=r"unknown key\(s\) \['mask_prob'\]"):
        O.ObjectiveConfig.from_dict({"mask_prob": 0.1})
    assert O.ObjectiveConfig(courses=("rtd", "itd"), course_weights=(3, 1)).probabilities() == [0.75, 0.0, 0.25]


def test_rtd_losses_and_labels(pair, outputs):
    batch, outs = outputs
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    r = outs["rtd"]
    t = {k: np.asarray(v) for k, v in r.tensors.items()}
    masked = t["gen_input"] == MASK
    assert masked.any() and not (masked & ((ids == BOS) | (ids == EOS) | (mask == 0))).any()
    # D's input differs from the original only where G filled a mask; labels are exactly those differences.
    assert (masked | (t["disc_input"] == ids)).all()
    np.testing.assert_array_equal(t["disc_labels"], (t["disc_input"] != ids).astype(np.int32))
    assert not np.isin(t["disc_input"][masked], [BOS, EOS, PAD, MASK]).any()
    # G's loss at the gathered positions equals the MLM loss of the full-vocabulary logits at the masks.
    full = pair.generator_logits(r.tensors["gen_input"], batch["attention_mask"])
    np.testing.assert_allclose(r.losses["gen"], mlm_loss(full, batch["input_ids"], masked.astype(np.float32)),
                               rtol=1e-5)
    d = pair.discriminator_logits(r.tensors["disc_input"], batch["attention_mask"])
    np.testing.assert_allclose(r.losses["disc"], rtd_loss(d, t["disc_labels"], mask), rtol=1e-5)
    total = 1.0 * r.losses["gen"] + 50.0 * r.losses["disc"] + 1.0 * r.losses["re_gen"] + 50.0 * r.losses["re_disc"]
    np.testing.assert_allclose(r.total(OBJ), total, rtol=1e-6)


def test_std_losses_and_labels(pair, outputs):
    batch, outs = outputs
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    s = outs["std"]
    t = {k: np.asarray(v) for k, v in s.tensors.items()}
    for row in range(len(ids)):  # a permutation of each row's tokens
        assert sorted(t["disc_input"][row]) == sorted(ids[row])
    changed = t["disc_input"] != ids
    assert changed.any()
    np.testing.assert_array_equal(t["disc_labels"], changed.astype(np.int32))
    full = pair.generator_logits(s.tensors["gen_input"], batch["attention_mask"])  # G sees the swapped text
    np.testing.assert_array_equal(t["gen_input"], t["disc_input"])
    np.testing.assert_allclose(s.losses["gen"], mlm_loss(full, batch["input_ids"], changed.astype(np.float32)),
                               rtol=1e-5)
    d = pair.discriminator_logits(s.tensors["disc_input"], batch["attention_mask"])
    np.testing.assert_allclose(s.losses["disc"], rtd_loss(d, t["disc_labels"], mask), rtol=1e-5)


def test_itd_losses_and_labels(pair, outputs):
    batch, outs = outputs
    ids = np.asarray(batch["input_ids"])
    i = outs["itd"]
    t = {k: np.asarray(v) for k, v in i.tensors.items()}
    inserted = t["disc_labels"] == 1
    assert inserted.any() and float(i.losses["gen"]) == 0.0
    assert (t["gen_input"][inserted] == MASK).all()  # G filled the inserted masks ...
    assert not np.isin(t["disc_input"][inserted], [BOS, EOS, PAD, MASK]).any()  # ... with ordinary tokens
    np.testing.assert_array_equal(t["disc_input"][~inserted & (t["attention_mask"] > 0)][:3], ids[0, :3])
    assert (t["attention_mask"].sum(1) >= np.asarray(batch["attention_mask"]).sum(1)).all()
    d = pair.discriminator_logits(i.tensors["disc_input"], i.tensors["attention_mask"])
    np.testing.assert_allclose(i.losses["disc"], rtd_loss(d, t["disc_labels"], t["attention_mask"]), rtol=1e-5)
    assert float(i.losses["re_gen"]) == 0.0 and float(i.losses["re_disc"]) == 0.0  # no notebook for ITD


@pytest.mark.parametrize("course", ["rtd", "std"])
def test_correction_losses_follow_the_notebook(pair, outputs, course):
    batch, outs = outputs
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = outs[course]
    verdict = out.tensors["disc_logits"] > 0  # D's verdicts on its course input
    regen, redisc = correction.correction_inputs(ids, out.tensors["disc_input"], verdict, MASK, mask)
    np.testing.assert_array_equal(out.tensors["regen_input"], regen)
    np.testing.assert_array_equal(out.tensors["redisc_input"], redisc)
    cells = correction.notebook_cells(ids, out.tensors["disc_input"], verdict, mask)
    caught = np.asarray(cells["replaced_judged_replaced"], np.float32)
    np.testing.assert_array_equal(out.tensors["regen_weights"], caught)
    # re-generation: G's MLM loss on the re-generation input at the caught positions
    full = pair.generator_logits(regen, mask)
    np.testing.assert_allclose(out.losses["re_gen"], mlm_loss(full, ids, caught), rtol=1e-5)
    # re-discrimination: D's loss on the re-discrimination input over every real token
    d = pair.discriminator_logits(redisc, mask)
    np.testing.assert_allclose(out.losses["re_disc"], rtd_loss(d, (redisc != ids).astype(jnp.int32), mask), rtol=1e-5)
    # switched off: both are zero, the course's own losses unchanged
    off = O.run_course(pair, batch, jax.random.key(3), OBJ, course, corrections=())
    assert float(off.losses["re_gen"]) == 0.0 and float(off.losses["re_disc"]) == 0.0
    np.testing.assert_allclose(off.losses["disc"], out.losses["disc"], rtol=1e-6)


def test_only_the_chosen_course_gets_its_corrections(pair):
    """re-RTD losses on rtd rows only: with the rtd switches alone, an all-std batch has no correction loss."""
    batch = _batch()
    rows = jnp.full((4,), 1, jnp.int32)  # every row std
    out = O.run_courses(pair, batch, jax.random.key(3), OBJ, rows, (True, True, False, False))
    assert float(out.losses["re_gen"]) == 0.0 and float(out.losses["re_disc"]) == 0.0
    out = O.run_courses(pair, batch, jax.random.key(3), OBJ, rows, (False, False, True, True))
    assert float(out.losses["re_disc"]) > 0.0


def test_dynamic_settings_match_static(pair):
    """One compiled step for every arm: settings read from the pair give the static objective's loss."""
    batch = _batch()
    electra = dataclasses.replace(OBJ, courses=("rtd",), corrections=())
    dyn = O.attach_settings(nnx.clone(pair), electra)
    np.testing.assert_array_equal(O.settings_array(electra), [1, 0, 0, 0, 0, 0, 0])
    for cfg in (electra, OBJ):
        O.attach_settings(dyn, cfg)
        f_static, f_dyn = O.make_objective(cfg), O.make_objective(cfg, dynamic=True)
        for seed in (0,):
            l1, a1 = f_static(pair, batch, jax.random.key(seed))
            l2, a2 = f_dyn(dyn, batch, jax.random.key(seed))
            np.testing.assert_allclose(l1, l2, rtol=1e-6)
            assert float(a1["weight"]) == 1.0 and float(a1["correct"]) == float(a1["disc_accuracy"])
            if cfg is electra:
                assert float(a2["n_rtd"]) == 4.0 and float(a2["loss_re_gen"]) == 0.0


def test_probe_reports_every_course(pair):
    probe = O.probe_courses(pair, _batch(), jax.random.key(0), OBJ)
    assert set(probe) == set(O.COURSES)
    for stats in probe.values():
        assert 0.0 < float(stats["replaced_share"]) < 1.0 and 0.0 <= float(stats["disc_accuracy"]) <= 1.0


def test_a_few_steps_reduce_the_electra_loss():
    """ELECTRA's objective under jit with AdamW on one repeated batch: the loss falls within a few steps."""
    import optax

    batch = _batch()
    cfg = dataclasses.replace(OBJ, courses=("rtd",), corrections=())
    model = ElectraPair(CFG, generator_config(CFG, 0.5), nnx.Rngs(1))
    objective = O.make_objective(cfg)
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, key):
        (loss, _), grads = nnx.value_and_grad(objective, has_aux=True)(model, batch, key)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt, jax.random.key(0))) for _ in range(12)]  # same corruption every step
    assert losses[-1] < 0.8 * losses[0]


def test_sampling_all_runs_every_course_every_step(pair):
    batch = _batch()
    cfg = dataclasses.replace(OBJ, sampling="all")
    for fn in (O.make_objective(cfg), O.make_objective(cfg, dynamic=True)):
        model = O.attach_settings(nnx.clone(pair), cfg)
        for seed in range(4):
            loss, aux = fn(model, batch, jax.random.key(seed))
            assert [float(aux[f"n_{c}"]) for c in O.COURSES] == [4.0, 4.0, 4.0]
            assert np.isfinite(float(loss)) and float(aux["loss_gen"]) > 0 and float(aux["loss_re_disc"]) > 0
    # the same as the courses run on a batch tiled once per course
    _, k_run = jax.random.split(jax.random.key(0))
    rows = jnp.repeat(jnp.arange(3, dtype=jnp.int32), 4)
    ref = O.run_courses(pair, O.tile_batch(batch, 3), k_run, cfg, rows)
    np.testing.assert_allclose(O.make_objective(cfg)(pair, batch, jax.random.key(0))[0], ref.total(cfg), rtol=1e-6)
    two = dataclasses.replace(cfg, courses=("rtd", "itd"), corrections=())
    _, aux = O.make_objective(two)(pair, batch, jax.random.key(0))
    assert [float(aux[f"n_{c}"]) for c in O.COURSES] == [4.0, 0.0, 4.0]
    # "step" draws one course for the whole batch
    _, aux = O.make_objective(dataclasses.replace(OBJ, sampling="step"))(pair, batch, jax.random.key(0))
    assert sorted(float(aux[f"n_{c}"]) for c in O.COURSES) == [0.0, 0.0, 4.0]


def test_token_types_reach_the_models_and_follow_itd_insertions(pair):
    batch = dict(_batch())
    types = np.zeros((4, 12), np.int32)
    types[:, 6:] = 1  # segment B
    types[1, 9:] = 0  # padding
    batch["token_type_ids"] = jnp.asarray(types)
    cfg = dataclasses.replace(OBJ, corrections=())
    with_types = O.run_course(pair, batch, jax.random.key(3), cfg, "rtd")
    without = O.run_course(pair, _batch(), jax.random.key(3), cfg, "rtd")
    np.testing.assert_array_equal(with_types.tensors["disc_input"] == MASK, without.tensors["disc_input"] == MASK)
    assert not np.allclose(with_types.tensors["disc_logits"], without.tensors["disc_logits"])
    d = pair.discriminator_logits(with_types.tensors["disc_input"], batch["attention_mask"], batch["token_type_ids"])
    np.testing.assert_allclose(with_types.tensors["disc_logits"], d, rtol=1e-5, atol=1e-6)
    t = {k: np.asarray(v) for k, v in O.run_course(pair, batch, jax.random.key(5), cfg, "itd").tensors.items()}
    row, m = 1, t["attention_mask"][1]  # the padded row has room for insertions
    ins = t["disc_labels"][row] == 1
    assert ins.any()
    kept = t["token_type_ids"][row][(m > 0) & ~ins]
    np.testing.assert_array_equal(kept, types[row, :9])  # every original token keeps its type
    for j in np.flatnonzero(ins):
        assert t["token_type_ids"][row, j] == t["token_type_ids"][row, j + 1]
    assert (t["token_type_ids"][row][m == 0] == 0).all()
