"""MCL (METHODS.md section 3) end to end: ELECTRA vs course arms vs course soups, on the biography world.

Stages (each cached in workdir/stages, see stages.py):
  world -> tokenizer -> pre_<arm>_s<seed> (an ElectraPair pre-trained for
  `pretrain.steps` on rich biographies of the background people, with the
  arm's courses; every `probe_every` steps a probe records each course's share
  of "replaced" labels on a fixed batch, and at the `curve` steps the weights
  are kept) -> soup ingredients ing_<name>_s<seed> (the warm-up arm's
  checkpoint at step W = warmup_fraction * steps, copied into the
  ingredient's checkpoint folder so its Trainer resumes from it: same
  optimizer state and learning-rate schedule, then steps W..N with the
  ingredient's correction losses) -> soup_uniform_s<seed> and the greedy soup
  (candidate soups scored on dev after fine-tuning) -> ft_<model> (the
  discriminator fine-tuned on each downstream task and evaluated on dev and
  test).
Then summary.json, mcl_report.md and two PNGs (label shares, score against
pre-training steps) are written from the stage results (cheap, always redone).

Equal steps: every arm and every ingredient has taken exactly
`pretrain.steps` optimizer steps with one learning-rate schedule; the
ingredients share their first W steps (the warm-up arm's own run: the
warm-up is not trained twice). Each seed seeds the pair's initialisation,
the data order, the corruption draws, and the fine-tuning heads, so arms are
compared seed by seed.

Downstream tasks: the built-in bios_qa and bios_pair (clue_jax.mcl.downstream)
over the "new" people (never in the pre-training corpus), split by person;
plus GLUE tasks / SQuAD 2.0 (`real_tasks`) when their tfds data is prepared in
`real_tasks.data_dir`, skipped with a note in the report otherwise. The
downstream score of a model is the mean over tasks of F1 (QA) or accuracy.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import time

import jax
import numpy as np
from flax import nnx

from clue_jax import workdir_fs
from clue_jax.data import bios, glue_squad
from clue_jax.data.batching import ArrayBatchSource
from clue_jax.data.tokenizer import encode_batch, load_tokenizer, train_bpe_tokenizer
from clue_jax.errors import UserInputError
from clue_jax.mcl import downstream, intrinsic, objective as mcl_objective, report, soups
from clue_jax.models import store
from clue_jax.models.encoder import ElectraPair, EncoderConfig, generator_config
from clue_jax.pipelines import common
from clue_jax.pipelines.stages import Stages, fingerprint
from clue_jax.train import logging_utils, loop, sharding as shard_lib

log = logging.getLogger("clue_jax")

# arm -> (self-supervision courses, correction losses)
ARMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "electra": (("rtd",), ()),
    "std": (("rtd", "std"), ()),
    "itd": (("rtd", "itd"), ()),
    "all3": (("rtd", "std", "itd"), ()),
    "mcl": (("rtd", "std", "itd"), mcl_objective.CORRECTIONS),
}
ARM_LABELS = {"electra": "ELECTRA (RTD)", "std": "+STD", "itd": "+ITD", "all3": "RTD+STD+ITD", "mcl": "MCL",
              "random": "random init (no pre-training)"}


# ------------------------------------------------------------------ model io
def model_configs(config, vocab_size: int) -> tuple[EncoderConfig, EncoderConfig]:
    values = dict(config.model.to_dict(), vocab_size=vocab_size)
    disc = EncoderConfig.from_dict(values, where="model")
    return disc, generator_config(disc, float(config.generator.width_fraction))


_LOAD: list[float] = []  # 1-minute load averages sampled during the run (the machine may be shared)
_PAIRS: dict[str, ElectraPair] = {}  # model_dir -> pair, so a stage that reads what this process wrote skips orbax


def create_pair(disc_cfg, gen_cfg, seed: int, mesh) -> ElectraPair:
    """Initialised under jit straight onto the mesh; the seed is traced, so every seed reuses one compile."""
    return store.create(lambda s: ElectraPair(disc_cfg, gen_cfg, nnx.Rngs(jax.random.key(s))), seed,
                        functools.partial(shard_lib.state_shardings, mesh=mesh), (disc_cfg, gen_cfg, mesh))


def save_pair(pair: ElectraPair, directory: str) -> None:
    directory = workdir_fs.join(directory)
    params = nnx.state(pair, nnx.Param)
    store.save(pair, directory, {"pair_config.json": {"discriminator": pair.disc_cfg.to_dict(),
                                                      "generator": pair.gen_cfg.to_dict()}})
    # A copy: a Trainer's model (e.g. at a snapshot) has its buffers donated by the next step.
    graphdef, _, rest = nnx.split(pair, nnx.Param, ...)
    _PAIRS[directory] = nnx.merge(graphdef, downstream.copy_state(params), rest)


def load_pair(directory: str, mesh) -> ElectraPair:
    """An ElectraPair saved by `save_pair`, placed on `mesh` (from memory when this process saved it)."""
    directory = workdir_fs.join(directory)
    if directory in _PAIRS:
        return _PAIRS[directory]
    path = os.path.join(directory, "pair_config.json")
    try:
        cfgs = json.loads(workdir_fs.read_text(path))
        disc = EncoderConfig.from_dict(cfgs["discriminator"], where=path)
        gen = EncoderConfig.from_dict(cfgs["generator"], where=path)
    except (OSError, KeyError, json.JSONDecodeError) as err:
        raise UserInputError(f"cannot read {path}: {' '.join(str(err).split())}") from None
    graphdef, params = nnx.split(nnx.eval_shape(lambda: ElectraPair(disc, gen, nnx.Rngs(0))), nnx.Param)
    shardings = shard_lib.state_shardings(params, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings)
    _PAIRS[directory] = nnx.merge(graphdef, store.restore(directory, target))
    return _PAIRS[directory]


def params_hash(state) -> str:
    digest = hashlib.sha256()
    for path, leaf in sorted(nnx.to_flat_state(state), key=lambda kv: str(kv[0])):
        digest.update(str(path).encode())
        digest.update(np.ascontiguousarray(jax.device_get(leaf.get_value() if hasattr(leaf, "get_value") else leaf))
                      .tobytes())
    return digest.hexdigest()[:12]


# ------------------------------------------------------------------ data
def world_people(config) -> dict[str, list[bios.Person]]:
    world = bios.build_world(bios.WorldConfig(**config.world.to_dict()))
    d = config.downstream
    need = d.train_people + d.dev_people + d.test_people
    if need > len(world.new):
        raise UserInputError(f"downstream needs {need} people (train+dev+test) but world.num_new={len(world.new)}")
    new = list(world.new)
    return {"background": list(world.background), "train": new[:d.train_people],
            "dev": new[d.train_people:d.train_people + d.dev_people],
            "test": new[d.train_people + d.dev_people:need]}


def two_segments(text: str) -> tuple[str, str | None]:
    """A text split at the sentence boundary nearest its middle (segment A, segment B); one sentence: (text, None)."""
    cuts = [i + 2 for i in range(len(text) - 2) if text[i] in ".!?" and text[i + 1] == " "]
    if not cuts:
        return text, None
    cut = min(cuts, key=lambda c: abs(2 * c - len(text)))
    return text[:cut].rstrip(), text[cut:]


def encode_corpus(tokenizer, texts, seq_len: int, segments: int) -> dict[str, np.ndarray]:
    """Pre-training rows: segments 1 = [CLS] text [SEP] (type 0); 2 = [CLS] A [SEP] B [SEP] with B of
    type 1, as fine-tuning's pairs. Over-long rows are cut (segments 2: longest segment first, both [SEP] kept)."""
    if segments == 1:
        ids, mask = encode_batch(tokenizer, texts, seq_len, add_bos=True, add_eos=True, on_overflow="truncate")
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    if segments != 2:
        raise UserInputError(f"corpus.segments={segments} must be 1 or 2")
    pairs = [glue_squad.PairExample(str(i), *two_segments(t), label=0) for i, t in enumerate(texts)]
    arrays = glue_squad.encode_pair_examples(tokenizer, pairs, seq_len)
    return {k: arrays[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def itd_capped_share(corpus: dict[str, np.ndarray], insert_rate: float, special: tuple[int, ...]) -> float:
    """Share of corpus rows with less free padding than the insertions ITD asks for (those get fewer)."""
    mask = corpus["attention_mask"] > 0
    free = (mask & ~np.isin(corpus["input_ids"], special)).sum(-1)
    wanted = np.maximum(np.round(insert_rate * free), 1)
    return float(np.mean(mask.shape[1] - mask.sum(-1) < wanted))


def pretraining_texts(people, bios_per_person: int, seed: int, style: dict) -> list[str]:
    """`bios_per_person` biographies per person in `style` (all six attributes), in person order."""
    texts = []
    for i, person in enumerate(people):
        rng = np.random.default_rng([seed, 31, i])
        texts.extend(downstream.bios_context(person, bios.ATTRIBUTES, rng, **style) for _ in range(bios_per_person))
    return texts


@dataclasses.dataclass
class Context:
    config: object
    workdir: str
    mesh: object
    stages: Stages
    tokenizer: object
    disc_cfg: EncoderConfig
    gen_cfg: EncoderConfig
    corpus: dict[str, np.ndarray]
    corpus_fp: str
    probe_batch: dict[str, np.ndarray]
    tasks: list[downstream.Task]
    tasks_fp: str
    notes: list[str]
    heldout: dict[str, np.ndarray] | None = None  # held-out text for the detection AUC (intrinsic.enabled)
    reference: dict[str, np.ndarray] | None = None  # heldout corrupted by the reference generator, with labels


def objective_config(config, tokenizer, courses, corrections) -> mcl_objective.ObjectiveConfig:
    special = (tokenizer.bos_token_id, tokenizer.eos_token_id)
    return mcl_objective.ObjectiveConfig.from_dict(dict(
        config.objective.to_dict(), courses=tuple(courses), corrections=tuple(corrections),
        mask_id=tokenizer.mask_token_id, protected_ids=special,
        banned_ids=tuple(sorted({*special, tokenizer.pad_token_id, tokenizer.mask_token_id}))))


def _real_tasks(config, tokenizer, max_len: int, notes: list[str]) -> list[downstream.Task]:
    """GLUE tasks and SQuAD 2.0 when prepared in real_tasks.data_dir; a note for each one that is not."""
    r = config.real_tasks
    data_dir = r.data_dir or None
    tasks = []
    wanted = [(t, "glue") for t in r.glue] + ([("squad_v2", "squad")] if r.squad else [])
    for name, family in wanted:
        try:
            if family == "glue":
                spec = glue_squad.GLUE_TASKS.get(name)
                if spec is None:
                    raise UserInputError(f"real_tasks.glue contains {name!r}; valid: {sorted(glue_squad.GLUE_TASKS)}")
                train = glue_squad.load_glue(name, "train", data_dir, limit=r.limit_train + r.dev_size)
                test = glue_squad.load_glue(name, "dev", data_dir, limit=r.limit_eval)
                num_labels, metric, stride = spec.num_labels, spec.metric, 0
            else:
                train = glue_squad.load_squad_v2("train", data_dir, limit=r.limit_train + r.dev_size)
                test = glue_squad.load_squad_v2("validation", data_dir, limit=r.limit_eval)
                num_labels, metric, stride = 1, None, int(r.get("doc_stride", 0))
        except glue_squad.DataNotPrepared as err:
            notes.append(f"{name}: skipped, data not present ({err})")
            log.info("real task %s skipped: data not present", name)
            continue
        if len(train) <= r.dev_size:
            notes.append(f"{name}: skipped, only {len(train)} training examples")
            continue
        splits = {"train": train[:-r.dev_size], "dev": train[-r.dev_size:], "test": test}
        tasks.append(downstream.make_task(name, splits, tokenizer, max_len, num_labels=num_labels, metric=metric,
                                          doc_stride=stride))
    return tasks


def prepare(config, workdir: str) -> Context:
    mesh = common.make_mesh(config)
    stages = Stages(workdir)
    people = world_people(config)
    c = config.corpus
    style = downstream.bio_style(c.style.to_dict() if hasattr(c.style, "to_dict") else c.style)
    texts = pretraining_texts(people["background"], c.bios_per_person, config.seed, style)
    tok_inputs = {"world": config.world.to_dict(), "corpus": c.to_dict(), "tokenizer": config.tokenizer.to_dict(),
                  "seed": config.seed}

    def tokenizer_stage(d):
        tok = train_bpe_tokenizer(texts, config.tokenizer.vocab_size, d)
        return {"path": d, "vocab_size": len(tok)}

    tok_res = stages.run("tokenizer", tok_inputs, tokenizer_stage)
    tokenizer = load_tokenizer(tok_res["path"])
    if tokenizer.mask_token_id is None:
        raise UserInputError(f"tokenizer {tok_res['path']} has no mask token")
    disc_cfg, gen_cfg = model_configs(config, len(tokenizer))
    if c.seq_len > disc_cfg.max_len or config.downstream.max_len > disc_cfg.max_len:
        raise UserInputError(f"corpus.seq_len={c.seq_len} and downstream.max_len={config.downstream.max_len} must be "
                             f"<= model.max_len={disc_cfg.max_len}")
    encoded = encode_corpus(tokenizer, texts, c.seq_len, int(c.get("segments", 1)))
    order = np.random.default_rng([config.seed, 41]).permutation(len(texts))
    corpus = {k: v[order] for k, v in encoded.items()}
    probe_n = min(c.num_probe, len(texts))
    probe = {k: v[:probe_n] for k, v in corpus.items()}
    d = config.downstream
    task_cfg = downstream.BiosTaskConfig(qa_per_person=d.qa_per_person, pair_per_person=d.pair_per_person,
                                         unanswerable_rate=d.unanswerable_rate, drop_max=d.drop_max,
                                         style=style, seed=config.seed)
    examples = downstream.builtin_tasks({s: people[s] for s in ("train", "dev", "test")}, task_cfg)
    wanted = tuple(d.get("tasks", tuple(examples)))
    for name in wanted:
        if name not in examples:
            raise UserInputError(f"downstream.tasks contains {name!r}; valid: {sorted(examples)}")
    tasks = [downstream.make_task(name, examples[name], tokenizer, d.max_len, on_overflow="error")
             for name in wanted]
    notes: list[str] = []
    tasks += _real_tasks(config, tokenizer, d.max_len, notes)
    tasks_fp = fingerprint([(t.name, {s: _arrays_fp(a) for s, a in t.arrays.items()}) for t in tasks])
    heldout = None
    if config.get("intrinsic", {}).get("enabled", False):
        texts_h = pretraining_texts(people["test"], 1, config.seed + 7, style)[:int(config.intrinsic.num_rows)]
        heldout = encode_corpus(tokenizer, texts_h, c.seq_len, int(c.get("segments", 1)))
    return Context(config, workdir, mesh, stages, tokenizer, disc_cfg, gen_cfg, corpus, _arrays_fp(corpus),
                   probe, tasks, tasks_fp, notes, heldout)


def _arrays_fp(arrays: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------ pre-training
def _probe_fn(cfg: mcl_objective.ObjectiveConfig):
    """Jitted per-course label-share probe; the model is an argument, so every arm reuses one compile."""
    return nnx.jit(lambda model, batch, rng: mcl_objective.probe_courses(model, batch, rng, cfg))


_PROBES: dict = {}


def probe_steps(config) -> tuple[int, list[int]]:
    """(probe interval, the snapshot steps of the score-vs-steps curve), both in optimizer steps."""
    steps = int(config.pretrain.steps)
    every = max(1, int(config.probe_every))
    snaps = sorted({min(steps, max(every, every * round(f * steps / every))) for f in config.curve.fractions})
    return every, [s for s in snaps if s < steps]


def _read_probes(stage_dir: str) -> list[dict]:
    path = os.path.join(stage_dir, "metrics.jsonl")
    out = []
    if workdir_fs.exists(path):
        for line in workdir_fs.read_text(path).splitlines():
            rec = json.loads(line)
            shares = {k[len("eval/"):]: v for k, v in rec.items() if k.startswith("eval/")}
            if shares:
                out.append({"step": rec["step"], **shares})
    dedup = {r["step"]: r for r in out}  # a resumed run may repeat a step
    return [dedup[s] for s in sorted(dedup)]


def pretrain(ctx: Context, name: str, courses, corrections, seed: int, stage_dir: str, *,
             start_from: str | None = None, keep_steps: int | None = None) -> dict:
    """Trains an ElectraPair with the given courses for pretrain.steps; returns the stage result.

    start_from: a checkpoint step folder to resume from (soup ingredients);
    keep_steps: also keep the full train state at this step (the warm-up arm).
    """
    config = ctx.config
    train_cfg = config.pretrain.copy_and_resolve_references()
    train_cfg.seed = seed
    every, snaps = probe_steps(config)
    train_cfg.eval_every = every
    if keep_steps:
        train_cfg.checkpoint_every = keep_steps
        train_cfg.keep_checkpoints = max(int(train_cfg.keep_checkpoints), math.ceil(train_cfg.steps / keep_steps) + 1)
    if start_from is not None and jax.process_index() == 0:
        target = os.path.join(stage_dir, "checkpoints", os.path.basename(start_from))
        if not workdir_fs.exists(target):
            workdir_fs.copytree(start_from, target)
    obj_cfg = objective_config(config, ctx.tokenizer, courses, corrections)
    probe_cfg = objective_config(config, ctx.tokenizer, mcl_objective.COURSES, ())
    probe = _PROBES.setdefault(probe_cfg, _probe_fn(probe_cfg))
    probe_batch = {k: jax.numpy.asarray(v) for k, v in ctx.probe_batch.items()}
    probe_key = jax.random.key(config.seed + 12345)  # the same corruptions at every probe: only G changes

    def eval_fn(model, step):
        _LOAD.append(os.getloadavg()[0])
        if step in snaps:
            save_pair(model, os.path.join(stage_dir, "snapshots", str(step)))
        res = jax.device_get(probe(model, probe_batch, probe_key))
        return {f"{c}/{k}": float(v) for c, stats in res.items() for k, v in stats.items()}

    t0 = time.time()
    pair = mcl_objective.attach_settings(create_pair(ctx.disc_cfg, ctx.gen_cfg, seed, ctx.mesh), obj_cfg)
    meta = {"model": {"discriminator": ctx.disc_cfg.to_dict(), "generator": ctx.gen_cfg.to_dict()}}
    # dynamic: the arm's courses/corrections are a step argument, so all arms share one compiled step
    trainer = loop.Trainer(pair, mcl_objective.make_objective(obj_cfg, dynamic=True), train_cfg, ctx.mesh,
                           stage_dir, meta=meta, stage=name)
    result = trainer.run(ArrayBatchSource(ctx.corpus, train_cfg.batch_size, seed=seed), eval_fn=eval_fn)
    if result.status != "done":
        log.warning("%s preempted at step %d; rerun the same command to resume", name, result.step)
        raise SystemExit(0)
    save_pair(result.model, os.path.join(stage_dir, "model"))
    return {"model_dir": os.path.join(stage_dir, "model"), "steps": result.step,
            "snapshots": {str(s): os.path.join(stage_dir, "snapshots", str(s)) for s in snaps
                          if workdir_fs.exists(os.path.join(stage_dir, "snapshots", str(s), "pair_config.json"))},
            "final_loss": result.metrics.get("loss"), "disc_accuracy": result.metrics.get("accuracy"),
            "probes": _read_probes(stage_dir), "seconds": round(time.time() - t0, 1),
            "objective": obj_cfg.to_dict()}


def _pretrain_inputs(ctx: Context, courses, corrections, seed: int) -> dict:
    c = ctx.config
    return {"corpus": ctx.corpus_fp, "model": c.model.to_dict(), "generator": c.generator.to_dict(),
            "objective": c.objective.to_dict(), "courses": list(courses), "corrections": list(corrections),
            "train": c.pretrain.to_dict(), "seed": seed, "probe_every": c.probe_every,
            "curve": c.curve.to_dict(), "num_probe": c.corpus.num_probe}


def warmup_step(config) -> int:
    w = int(round(config.soups.warmup_fraction * config.pretrain.steps))
    return max(1, min(int(config.pretrain.steps) - 1, w))


def pretrain_arm(ctx: Context, arm: str, seed: int) -> dict:
    courses, corrections = ARMS[arm]
    inputs = _pretrain_inputs(ctx, courses, corrections, seed)
    keep = None
    if ctx.config.soups.enabled and arm == ctx.config.soups.warmup_arm:
        keep = warmup_step(ctx.config)
        inputs["keep_step"] = keep
    return ctx.stages.run(f"pre_{arm}_s{seed}", inputs,
                          lambda d: pretrain(ctx, f"pre_{arm}_s{seed}", courses, corrections, seed, d,
                                             keep_steps=keep))


def pretrain_ingredient(ctx: Context, name: str, corrections, seed: int, warm: dict) -> dict:
    courses = ARMS[ctx.config.soups.warmup_arm][0]
    w = warmup_step(ctx.config)
    start = os.path.join(ctx.stages.path(f"pre_{ctx.config.soups.warmup_arm}_s{seed}"), "checkpoints", str(w))
    inputs = dict(_pretrain_inputs(ctx, courses, corrections, seed), warmup=warm["_fingerprint"], warmup_step=w)

    def run(d):
        if not os.path.isdir(start):
            raise UserInputError(f"warm-up checkpoint {start} is missing; delete {ctx.stages.path('pre_' + ctx.config.soups.warmup_arm + f'_s{seed}')} and rerun")
        return pretrain(ctx, f"ing_{name}_s{seed}", courses, corrections, seed, d, start_from=start)

    return ctx.stages.run(f"ing_{name}_s{seed}", inputs, run)


# ------------------------------------------------------------------ fine-tuning
def finetune_and_evaluate(ctx: Context, name: str, model_dir: str, model_fp: str, seed: int) -> dict:
    """Every downstream task: fine-tune the discriminator, evaluate on dev and test; plus the mean scores."""
    config = ctx.config
    inputs = {"model": model_fp, "finetune": config.finetune.to_dict(), "tasks": ctx.tasks_fp, "seed": seed,
              "max_answer_tokens": config.downstream.max_answer_tokens}

    def run(stage_dir):
        _LOAD.append(os.getloadavg()[0])
        encoder = load_pair(model_dir, ctx.mesh).discriminator_model().encoder
        out = {}
        for task in ctx.tasks:
            cfg = config.finetune.copy_and_resolve_references()
            cfg.seed = seed
            model = downstream.finetune(task, encoder, cfg, ctx.mesh, os.path.join(stage_dir, task.name), seed=seed)
            out[task.name] = downstream.evaluate(model, task, batch_size=config.downstream.eval_batch,
                                                 max_answer_tokens=config.downstream.max_answer_tokens)
        return {"tasks": out, "score_dev": float(np.mean([r["dev"]["score"] for r in out.values()])),
                "score_test": float(np.mean([r["test"]["score"] for r in out.values()]))}

    return _public(ctx.stages.run(f"ft_{name}", inputs, run))


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_")}


# ------------------------------------------------------------------ soups
def soup_arms(ctx: Context, seed: int, ingredients: dict[str, dict]) -> dict:
    """Ingredient scores, the uniform soup and the greedy soup (dev-scored) for one seed."""
    config = ctx.config
    names = sorted(ingredients)
    pairs = [load_pair(ingredients[n]["model_dir"], ctx.mesh) for n in names]
    graphdef, _, rest = nnx.split(pairs[0], nnx.Param, ...)
    states = [nnx.state(p, nnx.Param) for p in pairs]
    scored = {n: finetune_and_evaluate(ctx, f"ing_{n}_s{seed}", ingredients[n]["model_dir"],
                                       ingredients[n]["_fingerprint"], seed) for n in names}
    # Evaluated models by parameters: a soup equal (to 1e-6) to an ingredient or an earlier soup reuses its
    # scores (the greedy soup's candidates average in another order than the uniform soup: last-bit noise).
    known: list[tuple[object, dict]] = [(s, scored[n]) for n, s in zip(names, states)]
    out = {"ingredients": {n: scored[n] for n in names}}

    def same(a, b) -> bool:
        return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jax.numpy.max(jax.numpy.abs(x - y)) <= 1e-6),
                                                a, b)))

    def evaluate_soup(state, tag):
        for other, result in known:
            if same(state, other):
                return result
        h = params_hash(state)
        model_dir = os.path.join(ctx.stages.path("soups"), f"{tag}_{h}_s{seed}")
        if not workdir_fs.exists(os.path.join(model_dir, "pair_config.json")):
            save_pair(nnx.merge(graphdef, state, rest), model_dir)
        result = finetune_and_evaluate(ctx, f"soup_{tag}_{h}_s{seed}", model_dir, h, seed)
        known.append((state, result))
        return result

    if "uniform" in config.soups.kinds:
        out["uniform"] = evaluate_soup(soups.uniform_soup(states), "uniform")
    if "greedy" in config.soups.kinds:
        greedy = soups.greedy_soup(states, lambda s: evaluate_soup(s, "greedy")["score_dev"],
                                   order_by=[scored[n]["score_dev"] for n in names])
        out["greedy"] = dict(evaluate_soup(greedy.soup, "greedy"), chosen=[names[i] for i in greedy.chosen],
                             trials=[(names[i], s, k) for i, s, k in greedy.scores.trials])
    if "weighted" in config.soups.kinds:  # weights from the ingredients' dev scores (raw ones are ~uniform)
        w = soups.score_weights([scored[n]["score_dev"] for n in names], config.soups.get("weighting", "softmax"),
                                float(config.soups.get("tau", 1.0)))
        out["weighted"] = dict(evaluate_soup(soups.weighted_soup(states, w), "weighted"), weights=w)
    return out


# ------------------------------------------------------------------ references
def random_init_arm(ctx: Context, seed: int) -> dict:
    """A freshly initialised pair (no pre-training): the floor every pre-trained arm is read against."""
    def run(d):
        save_pair(create_pair(ctx.disc_cfg, ctx.gen_cfg, seed, ctx.mesh), os.path.join(d, "model"))
        return {"model_dir": os.path.join(d, "model")}

    inputs = {"model": ctx.config.model.to_dict(), "generator": ctx.config.generator.to_dict(), "seed": seed,
              "vocab": len(ctx.tokenizer)}
    return ctx.stages.run(f"random_s{seed}", inputs, run)


def detection_aucs(ctx: Context, pre: dict, arm: str, seed: int) -> dict[str, float]:
    """{step: D's detection AUC on the reference corruption} at the arm's snapshots and its final step.

    The reference corruption is built once, by the generator of intrinsic.reference_arm at the first seed.
    """
    i = ctx.config.intrinsic
    if ctx.reference is None:
        ref_pair = load_pair(pre[i.reference_arm]["model_dir"], ctx.mesh)
        cfg = objective_config(ctx.config, ctx.tokenizer, ("rtd",), ())
        ctx.reference = intrinsic.reference_corruption(ref_pair, ctx.heldout, cfg, seed=int(i.seed))
    dirs = dict(pre[arm].get("snapshots", {}), **{str(pre[arm].get("steps", 0)): pre[arm]["model_dir"]})
    return {step: intrinsic.detection_auc(load_pair(d, ctx.mesh), ctx.reference) for step, d in dirs.items()}


# ------------------------------------------------------------------ pipeline
def _check(config) -> None:
    for arm in config.arms:
        if arm not in ARMS:
            raise UserInputError(f"arms contains {arm!r}; valid arms: {sorted(ARMS)}")
    if config.soups.enabled:
        if config.soups.warmup_arm not in ARMS:
            raise UserInputError(f"soups.warmup_arm={config.soups.warmup_arm!r} is not one of {sorted(ARMS)}")
        if len(config.soups.ingredients) < 2:
            raise UserInputError("soups.ingredients needs at least 2 ingredients")
        for name, losses in config.soups.ingredients.items():
            for loss in losses:
                if loss not in mcl_objective.CORRECTIONS:
                    raise UserInputError(f"soups.ingredients.{name} has {loss!r}; valid: {mcl_objective.CORRECTIONS}")
        for kind in config.soups.kinds:
            if kind not in ("uniform", "greedy", "weighted"):
                raise UserInputError(f"soups.kinds contains {kind!r}; valid: uniform, greedy, weighted")
        if not 0.0 < config.soups.warmup_fraction < 1.0:
            raise UserInputError(f"soups.warmup_fraction={config.soups.warmup_fraction} must be in (0, 1)")
    for arm in config.curve.arms:
        if arm not in config.arms:
            raise UserInputError(f"curve.arms contains {arm!r}, which is not in arms={tuple(config.arms)}")
    intr = config.get("intrinsic", {})
    if intr and intr.get("enabled", False) and intr.reference_arm not in config.arms:
        raise UserInputError(f"intrinsic.reference_arm={intr.reference_arm!r} is not in arms={tuple(config.arms)}")


def _enable_compile_cache(config, workdir: str) -> None:
    """Persistent XLA cache: the same step compiled for every seed and model is built once."""
    path = config.get("compile_cache_dir", "") or os.path.join(workdir, "jax_cache")
    if path != "off" and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run(config, workdir: str) -> dict:
    t_start, cpu_start, load_start = time.time(), common.cpu_seconds(), os.getloadavg()
    _LOAD.clear()  # this run's samples only
    _check(config)
    _enable_compile_cache(config, workdir)
    ctx = prepare(config, workdir)
    seeds = [int(s) for s in config.seeds]
    summary: dict = {"arms": {}, "soups": {}, "curves": {}, "probes": {}, "intrinsic": {},
                     "notes": list(ctx.notes), "tasks": [t.name for t in ctx.tasks]}
    with_random = bool(config.get("random_init", False))
    arms = list(config.arms)
    need_warmup = config.soups.enabled and config.soups.warmup_arm not in arms
    for seed in seeds:
        pre = {arm: pretrain_arm(ctx, arm, seed) for arm in arms + ([config.soups.warmup_arm] if need_warmup else [])}
        for arm in arms:
            res = finetune_and_evaluate(ctx, f"pre_{arm}_s{seed}", pre[arm]["model_dir"], pre[arm]["_fingerprint"],
                                        seed)
            summary["arms"].setdefault(arm, {})[str(seed)] = res
            summary["probes"].setdefault(arm, {})[str(seed)] = pre[arm]["probes"]
            if ctx.heldout is not None:
                summary["intrinsic"].setdefault(arm, {})[str(seed)] = detection_aucs(ctx, pre, arm, seed)
        if with_random:
            rand = random_init_arm(ctx, seed)
            summary["arms"].setdefault("random", {})[str(seed)] = finetune_and_evaluate(
                ctx, f"random_s{seed}", rand["model_dir"], rand["_fingerprint"], seed)
            if ctx.heldout is not None:
                summary["intrinsic"].setdefault("random", {})[str(seed)] = detection_aucs(
                    ctx, {"random": dict(rand, steps=0)}, "random", seed)
        for arm in config.curve.arms:
            points = {}
            for step, snap_dir in pre[arm]["snapshots"].items():
                fp = fingerprint([pre[arm]["_fingerprint"], step])
                points[step] = finetune_and_evaluate(ctx, f"pre_{arm}_s{seed}_at{step}", snap_dir, fp, seed)
            points[str(pre[arm]["steps"])] = summary["arms"][arm][str(seed)]
            summary["curves"].setdefault(arm, {})[str(seed)] = {s: r["score_test"] for s, r in points.items()}
        if config.soups.enabled:
            warm = pre[config.soups.warmup_arm]
            ingredients = {name: pretrain_ingredient(ctx, name, tuple(losses), seed, warm)
                           for name, losses in config.soups.ingredients.items()}
            for name, res in ingredients.items():
                summary["probes"].setdefault(f"ing_{name}", {})[str(seed)] = res["probes"]
            summary["soups"][str(seed)] = soup_arms(ctx, seed, ingredients)
    summary["stages_ran"], summary["stages_reused"] = ctx.stages.ran, ctx.stages.reused
    summary["setup"] = {
        "pretrain_steps": int(config.pretrain.steps), "batch_size": int(config.pretrain.batch_size),
        "seq_len": int(config.corpus.seq_len), "seeds": seeds, "warmup_step": warmup_step(config),
        "discriminator": ctx.disc_cfg.to_dict(), "generator": ctx.gen_cfg.to_dict(),
        "corpus_docs": int(len(ctx.corpus["input_ids"])), "ingredients": config.soups.ingredients.to_dict(),
        "task_sizes": {t.name: {s: len(e) for s, e in t.examples.items()} for t in ctx.tasks},
        "objective": config.objective.to_dict(), "finetune_steps": int(config.finetune.steps),
        "segments": int(config.corpus.get("segments", 1)),
        "itd_capped_share": itd_capped_share(ctx.corpus, float(config.objective.insert_rate),
                                             (ctx.tokenizer.bos_token_id, ctx.tokenizer.eos_token_id)),
        "heldout_rows": 0 if ctx.heldout is None else int(len(ctx.heldout["input_ids"])),
    }
    summary["runtime"] = {
        "wall_s": round(time.time() - t_start, 1), "cpu_s": round(common.cpu_seconds() - cpu_start, 1),
        "load_avg_start": [round(x, 2) for x in load_start], "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(), "all_stages_reused": not ctx.stages.ran,
        "load_avg_sampled": {"mean": round(float(np.mean(_LOAD)), 2), "max": round(float(np.max(_LOAD)), 2),
                             "samples": len(_LOAD)} if _LOAD else None,
    }
    shown = arms + (["random"] if with_random else [])
    summary["claims"] = report.claims(summary, shown)
    if jax.process_index() == 0:
        summary["figures"] = report.write_figures(summary, workdir, arms)
        text = report.render(summary, shown, ARM_LABELS)
        workdir_fs.write_text(os.path.join(workdir, "mcl_report.md"), text)
        print(report.render_table(summary, shown, ARM_LABELS))
    common.write_json(os.path.join(workdir, "summary.json"), summary)
    logging_utils.write_eval_scalars(workdir, {**summary["arms"], "soups": summary["soups"]})
    return summary
