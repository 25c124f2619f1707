"""ELECTRA and MCL pre-training objectives for the shared Trainer (METHODS.md section 3).

One objective function `fn(model, batch, rng) -> (loss_mean, aux)` covers every
arm: ELECTRA (RTD alone), any mix of the self-supervision courses RTD, STD and
ITD, and any subset of the four self-correction losses of the correction
notebook. `model` is an `ElectraPair` (generator and discriminator over one
shared embedding module); everything runs inside the Trainer's one jitted,
sharded step.

Per course (G = generator, D = discriminator, w_g / w_d = gen_weight / disc_weight):
  rtd: mask `mask_rate` of the tokens; G's MLM loss at the masks; G's samples
       (stop_gradient, `courses.sample_tokens`) fill the masks; D labels a
       token replaced where it differs from the original.
  std: permute the tokens at `swap_rate` of the positions; G's swapped-LM loss
       restores the originals at the changed positions; D labels the changed
       positions. G's output does not feed D (D's input needs no G).
  itd: insert [MASK] at `insert_rate` new gaps; G fills them (no G loss: no
       ground truth); D labels the inserted positions.
Loss of one course: w_g * gen + w_d * disc (+ the correction terms below).

Self-correction (only after rtd and std; the notebook needs an original
token per position, which an insertion lacks): D's verdicts on its course
input (logits > 0, no gradient) against the truth give
`correction.correction_targets`; then
  re_<c>_gen:  G's MLM loss on the re-generation input (caught positions
               re-masked, everything else original), at the caught positions;
  re_<c>_disc: D's loss on the re-discrimination input (caught positions
               restored, misjudged tokens kept), over every real token,
weighted by regen_weight / redisc_weight.

Choices where METHODS.md is silent (all settings in `ObjectiveConfig`):
- Course sampling, `sampling="step"` (default): ONE enabled course per step
  (per micro-batch with gradient accumulation), drawn with probabilities
  `course_weights` (uniform by default) inside the jitted step through
  `lax.switch`, so an MCL step costs the same G + D passes as an ELECTRA step
  (plus the correction passes) and "equal steps" is also equal compute for the
  self-supervision courses. `sampling="all"` runs every enabled course on the
  whole batch each step and averages their losses (k times the compute).
- Rates 0.15 for all three corruptions; loss weights: gen 1, disc 50 (ELECTRA),
  regen 1, redisc 50 (a correction loss is weighted like the loss it repeats).
- D's loss counts every real token (ELECTRA's input mask), [CLS]/[SEP] included.
- The correction terms of a disabled course are 0; with `sampling="step"` the
  correction losses of rtd run only on the steps that drew rtd.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from clue_jax.errors import UserInputError
from clue_jax.mcl import correction, courses
from clue_jax.models.encoder import mlm_loss, rtd_loss

COURSES = ("rtd", "std", "itd")
CORRECTIONS = ("re_rtd_gen", "re_rtd_disc", "re_std_gen", "re_std_disc")
TERMS = ("gen", "disc", "re_gen", "re_disc")  # the loss terms of one course, always all present
SAMPLING = ("step", "all")

__all__ = ["COURSES", "CORRECTIONS", "ObjectiveConfig", "CourseOutput", "run_course", "make_objective",
           "probe_courses", "max_positions", "generator_logits_at"]


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
        object.__setattr__(self, "courses", tuple(self.courses))
        object.__setattr__(self, "corrections", tuple(self.corrections))
        object.__setattr__(self, "course_weights", tuple(float(w) for w in self.course_weights))
        object.__setattr__(self, "protected_ids", tuple(int(i) for i in self.protected_ids))
        object.__setattr__(self, "banned_ids", tuple(int(i) for i in self.banned_ids))
        if not self.courses:
            raise UserInputError("objective.courses is empty; use a subset of ('rtd', 'std', 'itd')")
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
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserInputError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(names)}")
        return cls(**values)

    def probabilities(self) -> list[float]:
        w = list(self.course_weights) or [1.0] * len(self.courses)
        return [x / sum(w) for x in w]


@dataclasses.dataclass
class CourseOutput:
    """One course on one batch: its loss terms (scalars), statistics and the tensors it built."""

    losses: dict[str, jax.Array]  # TERMS, unweighted means (0 where the course has no such term)
    stats: dict[str, jax.Array]  # replaced_share, disc_accuracy, caught_share (float32 scalars)
    tensors: dict[str, jax.Array]  # gen_input, disc_input, disc_labels, attention_mask, (regen_/redisc_...)

    def total(self, cfg: ObjectiveConfig) -> jax.Array:
        return (cfg.gen_weight * self.losses["gen"] + cfg.disc_weight * self.losses["disc"]
                + cfg.regen_weight * self.losses["re_gen"] + cfg.redisc_weight * self.losses["re_disc"])


def _keys(rng, n: int, use: bool) -> list:
    keys = list(jax.random.split(rng, n))
    return keys if use else [None] * n


def _mean(x, mask):
    m = mask.astype(jnp.float32)
    return jnp.sum(x.astype(jnp.float32) * m) / jnp.maximum(jnp.sum(m), 1.0)


def max_positions(rate: float, length: int, minimum: int = 1) -> int:
    """An upper bound on how many positions a course corrupts in a row of `length` tokens.

    The courses corrupt round(rate * n) (at least `minimum`) of n <= length
    free tokens, so G's vocabulary head is evaluated at this many gathered
    positions per row instead of all `length` (ELECTRA's max_predictions_per_seq).
    """
    return min(length, max(minimum, math.ceil(rate * length)) + 1)


def generator_logits_at(model, input_ids, attention_mask, positions, dropout_key=None):
    """G's MLM logits [B, P, V] at `positions` [B, P] only: the same as
    `model.generator_logits(...)` gathered at `positions`, without the V-wide head elsewhere."""
    k1, k2 = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
    x = model.embeddings(input_ids, None, k1)
    hidden = model.generator(x, attention_mask, k2)
    hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
    return model.mlm_head(hidden, model.embeddings.word_embeddings)


def _top_positions(weights, p: int):
    """The p positions of each row with the largest weight (weighted ones first), [B, p] int32."""
    return jax.lax.top_k(weights.astype(jnp.float32), p)[1]


def _gen_loss_and_fill(model, cfg, gen_input, mask, targets, weights, p, key_sample, key_drop, fill: bool):
    """G at the weighted positions: its loss there, and (fill) gen_input with samples at those positions."""
    pos = _top_positions(weights, p)
    take = lambda x: jnp.take_along_axis(x, pos, axis=1)
    logits = generator_logits_at(model, gen_input, mask, pos, key_drop)
    loss = mlm_loss(logits, take(targets), take(weights))
    filled = None
    if fill:
        sampled = courses.sample_tokens(key_sample, take(gen_input), logits, take(weights) > 0, cfg.temperature,
                                        cfg.banned_ids)
        filled = jnp.put_along_axis(gen_input, pos, sampled, axis=1, inplace=False)
    return loss, filled


def run_course(model, batch: dict, rng: jax.Array, cfg: ObjectiveConfig, course: str,
               corrections: Sequence[str] | None = None, *, train: bool = True) -> CourseOutput:
    """Runs `course` (rtd | std | itd) on `batch` (input_ids, attention_mask [B, T]) with the pair `model`.

    corrections: the correction losses to compute (default: cfg.corrections);
    those of another course are ignored. train=False: no dropout (probes).
    G's head runs only at the positions that need it (see `max_positions`).
    """
    if course not in COURSES:
        raise UserInputError(f"course={course!r} is not one of {COURSES}")
    corrections = cfg.corrections if corrections is None else tuple(corrections)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    length = ids.shape[1]
    k_corrupt, k_sample = jax.random.split(jax.random.fold_in(rng, COURSES.index(course)))
    use_drop = train and cfg.dropout
    d_gen, d_disc, d_regen, d_redisc = _keys(jax.random.fold_in(rng, 7), 4, use_drop)
    zero = jnp.zeros((), jnp.float32)
    protected = cfg.protected_ids or None

    if course == "rtd":
        p = max_positions(cfg.mask_rate, length)
        c = courses.rtd_corrupt(k_corrupt, ids, mask, cfg.mask_id, cfg.mask_rate, protected)
        gen, disc_input = _gen_loss_and_fill(model, cfg, c["gen_input"], mask, ids, c["gen_weights"], p, k_sample,
                                             d_gen, fill=True)
        labels = (disc_input != ids).astype(jnp.int32)  # a sample equal to the original counts as original
        d_mask, gen_input = mask, c["gen_input"]
    elif course == "std":
        p = max_positions(cfg.swap_rate, length, 2)
        s = courses.std_corrupt(k_corrupt, ids, mask, cfg.swap_rate, protected)
        gen, _ = _gen_loss_and_fill(model, cfg, s["gen_input"], mask, ids, s["gen_weights"], p, k_sample, d_gen,
                                    fill=False)
        disc_input, labels, d_mask, gen_input = s["disc_input"], s["disc_labels"], mask, s["gen_input"]
    else:  # itd
        p = max_positions(cfg.insert_rate, length)
        i = courses.itd_corrupt(k_corrupt, ids, mask, cfg.mask_id, cfg.insert_rate, protected)
        d_mask, gen_input = i["attention_mask"], i["gen_input"]
        inserted = i["inserted"].astype(jnp.float32)
        _, disc_input = _gen_loss_and_fill(model, cfg, gen_input, d_mask, gen_input, inserted, p, k_sample, d_gen,
                                           fill=True)
        gen = zero  # no ground truth for an inserted token
        labels = i["inserted"].astype(jnp.int32)

    d_logits = model.discriminator_logits(disc_input, d_mask, dropout_key=d_disc)
    disc = rtd_loss(d_logits, labels, d_mask)
    predicted = jax.lax.stop_gradient(d_logits) > 0
    real = d_mask > 0
    stats = {
        "replaced_share": _mean(labels, real),
        "disc_accuracy": _mean(predicted == (labels > 0), real),
        "caught_share": zero,
    }
    tensors = {"gen_input": gen_input, "disc_input": disc_input, "disc_labels": labels, "attention_mask": d_mask,
               "disc_logits": d_logits}
    re_gen, re_disc = zero, zero
    if course in ("rtd", "std"):
        want_gen, want_disc = f"re_{course}_gen" in corrections, f"re_{course}_disc" in corrections
        if want_gen or want_disc:
            t = correction.correction_targets(ids, disc_input, predicted, cfg.mask_id, mask)
            stats["caught_share"] = _mean(t["replaced_judged_replaced"], real)
            tensors.update({k: t[k] for k in ("regen_input", "regen_weights", "redisc_input", "redisc_labels",
                                              "redisc_weights")})
            if want_gen:  # caught positions are a subset of the corrupted ones: p positions suffice
                re_gen, _ = _gen_loss_and_fill(model, cfg, t["regen_input"], mask, ids, t["regen_weights"], p,
                                               k_sample, d_regen, fill=False)
            if want_disc:
                rd_logits = model.discriminator_logits(t["redisc_input"], mask, dropout_key=d_redisc)
                re_disc = rtd_loss(rd_logits, t["redisc_labels"], t["redisc_weights"])
    losses = {"gen": gen, "disc": disc, "re_gen": re_gen, "re_disc": re_disc}
    return CourseOutput(losses=losses, stats=stats, tensors=tensors)


def _scalars(out: CourseOutput, cfg: ObjectiveConfig, course_index: int) -> tuple[jax.Array, dict]:
    """The fixed-structure (loss, aux) one course contributes; aux has per-course indicator counts."""
    aux = {f"loss_{k}": v for k, v in out.losses.items()}
    aux.update(out.stats)
    aux.update({f"n_{c}": jnp.float32(i == course_index) for i, c in enumerate(COURSES)})
    return out.total(cfg), aux


def make_objective(cfg: ObjectiveConfig) -> Callable:
    """The Trainer objective: `fn(pair, batch, rng) -> (loss_mean, aux)`.

    aux["weight"] = 1 (the loss is already a mean; the loop sums weights over
    micro-batches and divides), aux["correct"] = D's token accuracy (so the
    loop logs it as "accuracy"), plus the unweighted terms loss_gen,
    loss_disc, loss_re_gen, loss_re_disc, replaced_share, caught_share and
    n_rtd / n_std / n_itd (which course ran), all summed over micro-batches.
    """
    probs = jnp.asarray(cfg.probabilities(), jnp.float32)

    def objective(model, batch, rng):
        k_choice, k_course = jax.random.split(rng)
        if cfg.sampling == "all" or len(cfg.courses) == 1:
            outs = [_scalars(run_course(model, batch, k_course, cfg, c), cfg, COURSES.index(c)) for c in cfg.courses]
            n = len(outs)
            loss = sum(o[0] for o in outs) / n
            aux = jax.tree.map(lambda *xs: sum(xs) / n, *[o[1] for o in outs])
            if n > 1:  # indicator counts: every course ran once
                aux.update({f"n_{c}": jnp.float32(c in cfg.courses) for c in COURSES})
        else:
            graphdef, state = nnx.split(model)
            branches = [
                (lambda c: lambda st, b, r: _scalars(run_course(nnx.merge(graphdef, st), b, r, cfg, c), cfg,
                                                     COURSES.index(c)))(c)
                for c in cfg.courses
            ]
            index = jax.random.choice(k_choice, len(cfg.courses), p=probs)
            loss, aux = jax.lax.switch(index, branches, state, batch, k_course)
        aux = dict(aux, weight=jnp.float32(1.0), correct=aux["disc_accuracy"])
        return loss, aux

    return objective


def probe_courses(model, batch: dict, rng: jax.Array, cfg: ObjectiveConfig,
                  course_names: Sequence[str] = COURSES) -> dict[str, dict[str, jax.Array]]:
    """Without dropout or gradient: per course, the share of "replaced" labels, D's accuracy and the caught share.

    Used at eval points to follow the label share of every course over
    training, including courses the arm does not train with. Jit it with the
    model as an argument: `jax.jit(lambda m, b, r: probe_courses(m, b, r, cfg))`.
    """
    out = {}
    for c in course_names:
        res = run_course(model, batch, rng, cfg, c, corrections=(f"re_{c}_gen",) if c != "itd" else (), train=False)
        out[c] = {k: jax.lax.stop_gradient(v) for k, v in res.stats.items()}
        out[c]["disc_loss"] = jax.lax.stop_gradient(res.losses["disc"])
    return out
