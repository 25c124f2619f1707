"""Mixture fine-tuning input: the set ratio of whole batches, in-order use of each source, exact resume."""
import numpy as np
import pytest

from clue_jax.data.batching import ArrayBatchSource
from clue_jax.data.mixture import MixtureBatchSource, with_loss_mask
from clue_jax.errors import UserInputError


def source(tag: int, rows: int = 12, batch: int = 4, seq: int = 6, seed: int = 0) -> ArrayBatchSource:
    """Rows whose ids encode (source tag, row index): tag * 1000 + row."""
    ids = (tag * 1000 + np.arange(rows))[:, None].repeat(seq, axis=1).astype(np.int32)
    mask = np.ones_like(ids)
    return ArrayBatchSource({"input_ids": ids, "attention_mask": mask, "loss_mask": mask}, batch, seed=seed)


def tags(batch) -> set:
    return set((batch["input_ids"][:, 0] // 1000).tolist())


@pytest.mark.parametrize("ratio, fraction", [(1.0, 1 / 2), (0.5, 1 / 3), (3.0, 3 / 4), (0.25, 1 / 5), (0.0, 0.0)])
def test_yields_the_set_ratio_of_whole_batches(ratio, fraction):
    mix = MixtureBatchSource(source(1), source(2), ratio)
    steps = 240
    kinds = []
    for s in range(steps):
        t = tags(mix.batch(s))
        assert len(t) == 1  # every batch comes from one source
        kinds.append(t.pop() == 2)
    kinds = np.array(kinds)
    assert kinds.sum() == round(steps * fraction)
    # Every prefix holds floor(n f) secondary batches: the ratio holds all along, not only on average.
    prefix = np.cumsum(kinds)
    assert all(prefix[n - 1] == int(np.floor(n * fraction + 1e-9)) for n in range(1, steps + 1))
    assert mix.secondary_before(steps) == kinds.sum()


def test_each_source_is_read_in_order_without_gaps():
    primary, secondary = source(1, seed=3), source(2, seed=4)
    mix = MixtureBatchSource(primary, secondary, 0.5)
    seen = {1: [], 2: []}
    for s in range(30):
        batch = mix.batch(s)
        seen[tags(batch).pop()].append(batch["input_ids"][:, 0].tolist())
    assert seen[1] == [primary.batch(i)["input_ids"][:, 0].tolist() for i in range(20)]
    assert seen[2] == [secondary.batch(i)["input_ids"][:, 0].tolist() for i in range(10)]


def test_pure_function_of_step_so_resume_is_exact():
    a = MixtureBatchSource(source(1, seed=5), source(2, seed=6), 0.7)
    b = MixtureBatchSource(source(1, seed=5), source(2, seed=6), 0.7)
    order = [17, 3, 0, 25, 3, 11]
    for s in order:  # any call order, a fresh instance: the same batch
        for key, value in a.batch(s).items():
            np.testing.assert_array_equal(value, b.batch(s)[key])
    resumed = [b.batch(s)["input_ids"] for s in range(10, 20)]
    straight = [a.batch(s)["input_ids"] for s in range(20)][10:]
    for x, y in zip(resumed, straight):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0, 2.0, 0.3])
def test_steps_for_primary_is_the_fewest_steps_with_that_many_primary_batches(ratio):
    mix = MixtureBatchSource(source(1), source(2), ratio)
    for n in (1, 7, 120):
        total = mix.steps_for_primary(n)
        primary = total - mix.secondary_before(total)
        assert primary == n
        assert not mix.is_secondary(total - 1)  # the last step is a primary batch, else one fewer would do
    assert mix.steps_for_primary(0) == 0


def test_sources_must_agree_and_ratio_must_be_valid():
    with pytest.raises(UserInputError, match="keys"):
        other = ArrayBatchSource({"input_ids": np.zeros((8, 6), np.int32), "attention_mask": np.ones((8, 6), np.int32)}, 4)
        MixtureBatchSource(source(1), other, 1.0)
    with pytest.raises(UserInputError, match="seq_len"):
        MixtureBatchSource(source(1), source(2, seq=7), 1.0)
    with pytest.raises(UserInputError, match="ratio"):
        MixtureBatchSource(source(1), source(2), -1.0)
    with pytest.raises(UserInputError, match="ratio"):
        MixtureBatchSource(source(1), source(2), float("nan"))


def test_with_loss_mask_counts_every_real_token():
    arrays = {"input_ids": np.arange(6, dtype=np.int32).reshape(2, 3), "attention_mask": np.array([[1, 1, 1], [1, 1, 0]])}
    out = with_loss_mask(arrays)
    np.testing.assert_array_equal(out["loss_mask"], arrays["attention_mask"])
    assert "loss_mask" not in arrays and out["loss_mask"].dtype == np.int32
