"""ELECTRA and MCL pre-training objectives for the shared Trainer (docs/methods.md, "MCL").

One objective `fn(pair, batch, rng) -> (loss_mean, aux)` covers every arm:
ELECTRA (RTD alone), any mix of the self-supervision courses RTD, STD and
ITD, and any subset of the four self-correction losses. `pair` is an
`ElectraPair` (generator G and discriminator D over one shared embedding
module); everything runs inside the Trainer's one jitted, sharded step.

Courses (each row of the batch follows one course):
  rtd: mask `mask_rate` of the tokens; G's MLM loss at the masks; G's samples
       (no gradient, `courses.sample_tokens`) fill them; D labels a token
       replaced where it differs from the original.
  std: permute the tokens at `swap_rate` of the positions; G's swapped-LM
       loss restores the originals at the changed positions; D labels the
       changed positions (D's input needs no G).
  itd: insert [MASK] at `insert_rate` new gaps; G fills them (no G loss: no
       ground truth); D labels the inserted positions.
All three corruptions are computed for every row (integer ops, cheap) and
each row keeps its own course's, so ONE G pass and ONE D pass serve any mix
of courses. G's vocabulary head runs only at the gathered positions that
need it (`max_positions`, ELECTRA's max_predictions_per_seq).

Self-correction (rtd and std rows; an inserted token has no original, so ITD
has no notebook): D's verdicts (logits > 0, no gradient) against the truth
give `correction.correction_targets`;
  re_<c>_gen:  G's MLM loss on the re-generation input (caught positions
               re-masked, the rest original), at the caught positions;
  re_<c>_disc: D's loss on the re-discrimination input (caught positions
               restored, misjudged tokens kept), over every real token.
One extra G pass and one extra D pass serve both courses; each is skipped
(`lax.cond`) when no row of the batch needs it.

Loss: gen_weight * gen + disc_weight * disc + regen_weight * re_gen +
redisc_weight * re_disc, each term a mean over the positions it counts,
pooled over the rows that have it.

Choices where the paper is silent (settings in `ObjectiveConfig`):
- `sampling="step"` (default): one course per step for the whole batch (per
  micro-batch under accumulation), drawn with probabilities `course_weights`
  (uniform over the enabled courses by default); `"example"`: one course per
  row. Either way a step costs one G + one D pass (plus the correction
  passes), so at equal steps the course arms spend the compute of ELECTRA.
  `"all"` (the published comparison): every enabled course on every step,
  each on its own copy of the whole batch (the batch is tiled once per
  course, `course_weights` unused), so RTD and its MLM loss see every step
  and a step of a 3-course arm costs about 3 of ELECTRA's. Each loss term is
  a mean over the positions of all courses that have it.
- Rates 0.15 for all three corruptions; weights gen 1, disc 50 (ELECTRA),
  regen 1, redisc 50 (a correction loss is weighted like the loss it repeats).
- D's loss counts every real token (ELECTRA's input mask), [CLS]/[SEP] included.
- `batch["token_type_ids"]` (optional, default 0) reach both models as in
  fine-tuning; ITD's inserted token takes the type of the token after it.

`make_objective(cfg, dynamic=True)` reads the courses and corrections from
the pair's `mcl_settings` state (`attach_settings`) instead of compiling them
in: every arm then runs the same compiled step (one compile per process, and
the persistent compilation cache serves every later run).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clue_jax import dataclass_config
from clue_jax.errors import UserInputError
from clue_jax.mcl import correction, courses
from clue_jax.models.encoder_losses import mlm_loss, rtd_loss

COURSES = ("rtd", "std", "itd")
CORRECTIONS = ("re_rtd_gen", "re_rtd_disc", "re_std_gen", "re_std_disc")
TERMS = ("gen", "disc", "re_gen", "re_disc")
SAMPLING = ("step", "example", "all")

__all__ = ["COURSES", "CORRECTIONS", "TERMS", "ObjectiveConfig", "CourseOutput", "run_courses", "run_course",
           "make_objective", "probe_courses", "tile_batch", "max_positions", "generator_logits_at", "CourseSettings",
           "settings_array", "attach_settings"]


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Which courses and correction losses an arm trains with, and the corruption/loss settings."""

    courses: tuple[str, ...] = ("rtd",)
    corrections: tuple[str, ...] = ()
    sampling: str = "step"
    course_weights: tuple[float, ...] = ()  # sampling probabilities per course (normalised); () = uniform
    mask_rate: float = 0.15
    swap_rate: float = 0.15
    insert_rate: float = 0.15
    gen_weight: float = 1.0
    disc_weight: float = 50.0
    regen_weight: float = 1.0
    redisc_weight: float = 50.0
    temperature: float = 1.0
    mask_id: int = 3
    protected_ids: tuple[int, ...] = ()  # never corrupted (e.g. [CLS]/BOS, [SEP]/EOS); padding always is
    banned_ids: tuple[int, ...] = ()  # never sampled by G (e.g. [MASK], [PAD], BOS, EOS)
    dropout: bool = True  # pass dropout keys to the models (active only when the encoder's dropout > 0)

    def __post_init__(self):
        for name in ("courses", "corrections"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "course_weights", tuple(float(w) for w in self.course_weights))
        object.__setattr__(self, "protected_ids", tuple(int(i) for i in self.protected_ids))
        object.__setattr__(self, "banned_ids", tuple(int(i) for i in self.banned_ids))
        if not self.courses:
            raise UserInputError(f"objective.courses is empty; use a subset of {COURSES}")
        for c in self.courses:
            if c not in COURSES:
                raise UserInputError(f"objective.courses contains {c!r}; valid courses: {COURSES}")
        if len(set(self.courses)) != len(self.courses):
            raise UserInputError(f"objective.courses={self.courses} repeats a course")
        for c in self.corrections:
            if c not in CORRECTIONS:
                raise UserInputError(f"objective.corrections contains {c!r}; valid losses: {CORRECTIONS}")
            if c.split("_")[1] not in self.courses:
                raise UserInputError(f"objective.corrections has {c!r} but course {c.split('_')[1]!r} is not "
                                     f"in objective.courses={self.courses}")
        if self.sampling not in SAMPLING:
            raise UserInputError(f"objective.sampling={self.sampling!r} is not one of {SAMPLING}")
        if self.course_weights:
            if len(self.course_weights) != len(self.courses):
                raise UserInputError(f"objective.course_weights has {len(self.course_weights)} entries for "
                                     f"{len(self.courses)} courses")
            if min(self.course_weights) < 0 or sum(self.course_weights) <= 0:
                raise UserInputError(f"objective.course_weights={self.course_weights} must be >= 0 with a "
                                     "positive sum")
        for name in ("mask_rate", "swap_rate", "insert_rate"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise UserInputError(f"objective.{name}={getattr(self, name)} must be in (0, 1)")
        for name in ("gen_weight", "disc_weight", "regen_weight", "redisc_weight", "temperature"):
            if getattr(self, name) < 0:
                raise UserInputError(f"objective.{name}={getattr(self, name)} must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "objective") -> "ObjectiveConfig":
        return dataclass_config.from_dict(cls, values, where)

    def probabilities(self) -> list[float]:
        """Sampling probability of each of COURSES (0 for the courses that are off)."""
        w = list(self.course_weights) or [1.0] * len(self.courses)
        probs = dict(zip(self.courses, w))
        total = sum(w)
        return [probs.get(c, 0.0) / total for c in COURSES]


@dataclasses.dataclass
class CourseOutput:
    """The courses on one batch: loss terms (unweighted means), statistics and the tensors built."""

    losses: dict[str, jax.Array]  # TERMS (0 where no row has the term)
    stats: dict[str, jax.Array]  # replaced_share, disc_accuracy, caught_share, n_<course> (rows)
    tensors: dict[str, jax.Array]  # gen_input, disc_input, disc_labels, attention_mask, token_type_ids, disc_logits, regen_*, redisc_*

    def total(self, cfg: ObjectiveConfig) -> jax.Array:
        return (cfg.gen_weight * self.losses["gen"] + cfg.disc_weight * self.losses["disc"]
                + cfg.regen_weight * self.losses["re_gen"] + cfg.redisc_weight * self.losses["re_disc"])


# ----------------------------------------------------------------------------- pieces


def max_positions(rate: float, length: int, minimum: int = 1) -> int:
    """An upper bound on how many positions a course corrupts in a row of `length` tokens.

    The courses corrupt round(rate * n) (at least `minimum`) of n <= length
    free tokens, so G's vocabulary head is evaluated at this many gathered
    positions per row instead of all `length`.
    """
    return min(length, max(minimum, math.ceil(rate * length)) + 1)


def generator_logits_at(model, input_ids, attention_mask, positions, dropout_key=None, token_type_ids=None):
    """G's MLM logits [B, P, V] at `positions` [B, P] only: `model.generator_logits(...)`
    gathered at `positions`, without running the V-wide head elsewhere."""
    k1, k2 = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
    hidden = model.generator(model.embeddings(input_ids, token_type_ids, k1), attention_mask, k2)
    hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
    return model.mlm_head(hidden, model.embeddings.word_embeddings)


def _gen_at(model, cfg, gen_input, mask, types, targets, weights, p, key_sample, key_drop, fill: bool):
    """G at the p most-weighted positions per row: its loss there and (fill) gen_input with samples there."""
    pos = jax.lax.top_k(weights.astype(jnp.float32), p)[1]
    take = lambda x: jnp.take_along_axis(x, pos, axis=1)
    logits = generator_logits_at(model, gen_input, mask, pos, key_drop, types)
    loss = mlm_loss(logits, take(targets), take(weights))
    if not fill:
        return loss, None
    sampled = courses.sample_tokens(key_sample, take(gen_input), logits, take(weights) > 0, cfg.temperature,
                                    cfg.banned_ids)
    return loss, jnp.put_along_axis(gen_input, pos, sampled, axis=1, inplace=False)


def _gated(flag, fn, model, *args):
    """fn(model, *args) (a float32 scalar) when `flag`, else 0.

    A Python bool decides at trace time; a traced one becomes `lax.cond`, so
    only the taken branch runs.
    """
    if isinstance(flag, bool):
        return fn(model, *args) if flag else jnp.zeros((), jnp.float32)
    graphdef, state = nnx.split(model)
    return jax.lax.cond(flag, lambda st, *a: fn(nnx.merge(graphdef, st), *a),
                        lambda st, *a: jnp.zeros((), jnp.float32), state, *args)


def _mean(x, mask):
    m = mask.astype(jnp.float32)
    return jnp.sum(x.astype(jnp.float32) * m) / jnp.maximum(jnp.sum(m), 1.0)


def _rows(cond_b, x_true, x_false):
    return jnp.where(cond_b.reshape((-1,) + (1,) * (x_true.ndim - 1)), x_true, x_false)


# ----------------------------------------------------------------------------- the courses


def run_courses(model, batch: dict, rng: jax.Array, cfg: ObjectiveConfig, row_course: jax.Array,
                switches=None, *, train: bool = True) -> CourseOutput:
    """Runs each row's course (row_course [B] int: index into COURSES) on `batch` with the pair `model`.

    switches: the correction losses, a [4] bool/float array over CORRECTIONS
    (traced: gated at run time) or None = cfg.corrections (compiled in).
    train=False: no dropout (probes).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    types = batch.get("token_type_ids")
    types = jnp.zeros_like(ids) if types is None else types
    length = ids.shape[1]
    k_rtd, k_std, k_itd, k_sample, k_drop = jax.random.split(rng, 5)
    use_drop = train and cfg.dropout
    d_gen, d_disc, d_regen, d_redisc = list(jax.random.split(k_drop, 4)) if use_drop else [None] * 4
    protected = cfg.protected_ids or None
    is_rtd, is_std, is_itd = (row_course == 0), (row_course == 1), (row_course == 2)

    r = courses.rtd_corrupt(k_rtd, ids, mask, cfg.mask_id, cfg.mask_rate, protected)
    s = courses.std_corrupt(k_std, ids, mask, cfg.swap_rate, protected)
    i = courses.itd_corrupt(k_itd, ids, mask, cfg.mask_id, cfg.insert_rate, protected)
    inserted = i["inserted"].astype(jnp.float32)
    gen_input = _rows(is_rtd, r["gen_input"], _rows(is_std, s["gen_input"], i["gen_input"]))
    d_mask = _rows(is_itd, i["attention_mask"], mask)
    # ITD shifts the tokens: each keeps its type; an insertion takes the type of the token after it.
    src = i["source_index"]
    src = jnp.where(src < 0, jnp.pad(src[:, 1:], ((0, 0), (0, 1)), constant_values=-1), src)
    itd_types = jnp.where(i["attention_mask"] > 0, jnp.take_along_axis(types, jnp.maximum(src, 0), axis=1), 0)
    d_types = _rows(is_itd, itd_types, types)
    # G's loss positions (rtd: masks, std: changed positions) and its fill positions (rtd: masks, itd: inserts)
    gen_weights = _rows(is_rtd, r["gen_weights"], _rows(is_std, s["gen_weights"], jnp.zeros_like(inserted)))
    targets = _rows(is_itd, i["gen_input"], ids)
    fill_weights = _rows(is_rtd, r["gen_weights"], _rows(is_itd, inserted, jnp.zeros_like(inserted)))
    p = max(max_positions(cfg.mask_rate, length), max_positions(cfg.swap_rate, length, 2),
            max_positions(cfg.insert_rate, length))
    # One G pass: the loss counts gen_weights, the samples fill fill_weights (both among the p gathered).
    pos = jax.lax.top_k(gen_weights + fill_weights, p)[1]
    take = lambda x: jnp.take_along_axis(x, pos, axis=1)
    g_logits = generator_logits_at(model, gen_input, d_mask, pos, d_gen, d_types)
    gen = mlm_loss(g_logits, take(targets), take(gen_weights))
    sampled = courses.sample_tokens(k_sample, take(gen_input), g_logits, take(fill_weights) > 0, cfg.temperature,
                                    cfg.banned_ids)
    filled = jnp.put_along_axis(gen_input, pos, sampled, axis=1, inplace=False)
    disc_input = _rows(is_std, s["disc_input"], filled)
    labels = _rows(is_itd, i["inserted"].astype(jnp.int32), (disc_input != ids).astype(jnp.int32))

    d_logits = model.discriminator_logits(disc_input, d_mask, d_types, dropout_key=d_disc)
    disc = rtd_loss(d_logits, labels, d_mask)
    predicted = jax.lax.stop_gradient(d_logits) > 0
    real = d_mask > 0
    stats = {"replaced_share": _mean(labels, real), "disc_accuracy": _mean(predicted == (labels > 0), real)}
    for k, c in enumerate(COURSES):
        stats[f"n_{c}"] = jnp.sum((row_course == k).astype(jnp.float32))

    # Correction notebook, for the rtd and std rows.
    if switches is None:
        switches = tuple(c in cfg.corrections for c in CORRECTIONS)
    on = [bool(x) if isinstance(x, (bool, np.bool_)) else jnp.asarray(x) > 0 for x in switches]
    regen_rows = (is_rtd & on[0]) | (is_std & on[2])
    redisc_rows = (is_rtd & on[1]) | (is_std & on[3])
    static = all(isinstance(x, bool) for x in on)
    want_gen = (on[0] or on[2]) if static else jnp.any(regen_rows)
    want_disc = (on[1] or on[3]) if static else jnp.any(redisc_rows)
    t = correction.correction_targets(ids, disc_input, predicted, cfg.mask_id, mask)
    regen_w = t["regen_weights"] * regen_rows[:, None]
    redisc_w = t["redisc_weights"] * redisc_rows[:, None]
    p_fix = max(max_positions(cfg.mask_rate, length), max_positions(cfg.swap_rate, length, 2))
    re_gen = _gated(want_gen, lambda m, x, w, k: _gen_at(m, cfg, x, mask, types, ids, w, p_fix, k_sample, k, False)[0],
                    model, t["regen_input"], regen_w, d_regen)
    re_disc = _gated(want_disc, lambda m, x, y, w, k: rtd_loss(m.discriminator_logits(x, mask, types, dropout_key=k), y, w),
                     model, t["redisc_input"], t["redisc_labels"], redisc_w, d_redisc)
    stats["caught_share"] = _mean(t["replaced_judged_replaced"], real & ~is_itd[:, None])
    tensors = {"gen_input": gen_input, "disc_input": disc_input, "disc_labels": labels, "attention_mask": d_mask,
               "token_type_ids": d_types,
               "disc_logits": d_logits, "gen_weights": gen_weights, "regen_input": t["regen_input"],
               "regen_weights": regen_w, "redisc_input": t["redisc_input"], "redisc_labels": t["redisc_labels"],
               "redisc_weights": redisc_w}
    losses = {"gen": gen, "disc": disc, "re_gen": re_gen, "re_disc": re_disc}
    return CourseOutput(losses=losses, stats=stats, tensors=tensors)


def run_course(model, batch: dict, rng: jax.Array, cfg: ObjectiveConfig, course: str,
               corrections: Sequence[str] | None = None, *, train: bool = True) -> CourseOutput:
    """`run_courses` with every row on `course`; corrections default to cfg.corrections."""
    if course not in COURSES:
        raise UserInputError(f"course={course!r} is not one of {COURSES}")
    corrections = cfg.corrections if corrections is None else tuple(corrections)
    rows = jnp.full((batch["input_ids"].shape[0],), COURSES.index(course), jnp.int32)
    return run_courses(model, batch, rng, cfg, rows, tuple(c in corrections for c in CORRECTIONS), train=train)


# ----------------------------------------------------------------------------- the objective


class CourseSettings(nnx.Variable):
    """An arm's course probabilities [3] and correction switches [4] (float32 [7]) as model state.

    Not a Param: the Trainer hands it to the jitted step as a frozen argument,
    so every arm runs the same compiled step.
    """


def settings_array(cfg: ObjectiveConfig) -> np.ndarray:
    """[p_rtd, p_std, p_itd, re_rtd_gen, re_rtd_disc, re_std_gen, re_std_disc] for cfg."""
    return np.asarray(cfg.probabilities() + [float(c in cfg.corrections) for c in CORRECTIONS], np.float32)


def attach_settings(pair, cfg: ObjectiveConfig):
    """Stores cfg's courses and corrections on the pair (`pair.mcl_settings`) for `make_objective(dynamic=True)`."""
    pair.mcl_settings = CourseSettings(jnp.asarray(settings_array(cfg)))
    return pair


def make_objective(cfg: ObjectiveConfig, dynamic: bool = False) -> Callable:
    """The Trainer objective: `fn(pair, batch, rng) -> (loss_mean, aux)`.

    dynamic=False: cfg.courses and cfg.corrections are compiled in (passes an
    arm never needs are not built). dynamic=True: they come from
    `pair.mcl_settings` at run time (see the module docstring).

    aux: weight = 1 (the loss is already a mean; the loop sums weights over
    micro-batches and divides), correct = D's token accuracy (logged as
    "accuracy"), the unweighted terms loss_gen, loss_disc, loss_re_gen,
    loss_re_disc, replaced_share, caught_share and n_rtd / n_std / n_itd
    (rows per course), all summed over micro-batches by the loop.
    """
    fixed = jnp.asarray(cfg.probabilities(), jnp.float32)

    def objective(model, batch, rng):
        k_course, k_run = jax.random.split(rng)
        if dynamic:
            settings = jnp.asarray(model.mcl_settings[...], jnp.float32)
            probs, switches = settings[:3], settings[3:]
        else:
            probs, switches = fixed, None
        b = batch["input_ids"].shape[0]
        shape = (1,) if cfg.sampling == "step" else (b,)
        rows = jnp.broadcast_to(jax.random.categorical(k_course, jnp.log(probs), shape=shape), (b,))
        if cfg.sampling == "all":  # every enabled course on its own copy of the batch
            batch = tile_batch(batch, len(cfg.courses))
            rows = jnp.repeat(jnp.asarray([COURSES.index(c) for c in cfg.courses], jnp.int32), b)
        out = run_courses(model, batch, k_run, cfg, rows, switches)
        aux = {f"loss_{k}": v for k, v in out.losses.items()}
        aux.update(out.stats)
        aux.update(weight=jnp.float32(1.0), correct=out.stats["disc_accuracy"])
        return out.total(cfg), aux

    return objective


def tile_batch(batch: dict, n: int) -> dict:
    """The model inputs of `batch` (ids, mask, token types when present) repeated n times along the rows."""
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch]
    return {k: jnp.concatenate([batch[k]] * n) for k in keys}


def probe_courses(model, batch: dict, rng: jax.Array, cfg: ObjectiveConfig,
                  course_names: Sequence[str] = COURSES) -> dict[str, dict[str, jax.Array]]:
    """Per course, without dropout or gradient: share of "replaced" labels, D's accuracy and loss, caught share.

    Used at eval points to follow every course's label share over training,
    including courses the arm does not train with. The batch is repeated once
    per course and each copy follows one course, so a single G and D pass
    (one compile) serves them all. "caught" = replaced (inserted) and judged
    so. Jit it with the model as an argument:
    `nnx.jit(lambda m, b, r: probe_courses(m, b, r, cfg))`.
    """
    n, b = len(course_names), batch["input_ids"].shape[0]
    tiled = tile_batch(batch, n)
    rows = jnp.repeat(jnp.asarray([COURSES.index(c) for c in course_names], jnp.int32), b)
    res = run_courses(model, tiled, rng, cfg, rows, (False,) * len(CORRECTIONS), train=False)
    t = res.tensors
    real = t["attention_mask"] > 0
    labels = t["disc_labels"] > 0
    predicted = t["disc_logits"] > 0
    out = {}
    for g, c in enumerate(course_names):
        sl = slice(g * b, (g + 1) * b)
        stats = {"replaced_share": _mean(labels[sl], real[sl]),
                 "disc_accuracy": _mean(predicted[sl] == labels[sl], real[sl]),
                 "caught_share": _mean(labels[sl] & predicted[sl], real[sl]),
                 "disc_loss": rtd_loss(t["disc_logits"][sl], t["disc_labels"][sl], t["attention_mask"][sl])}
        out[c] = jax.tree.map(jax.lax.stop_gradient, stats)
    return out
