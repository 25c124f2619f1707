"""Continual pre-training with clue dropout, shared by the knowledge and replication pipelines.

`prepare` runs everything before the students train (world, tokenizer, base models, documents, teacher
scores); `train_and_evaluate` runs one arm: a base model learns the documents with the arm's dropout, then
answers the probes. Every stage is cached in workdir/stages (see stages.py).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clue_jax import workdir_fs
from clue_jax.clues import dropout, scoring
from clue_jax.data import bios, lm_data
from clue_jax.data.batching import ArrayBatchSource, ConcatBatchSource
from clue_jax.data.tokenizer import load_tokenizer, protected_token_ids, require_same_tokenizer
from clue_jax.errors import UserInputError
from clue_jax.eval import corpus_probes, qa_eval, value_nll
from clue_jax.models import factory, lora
from clue_jax.pipelines import common, validate
from clue_jax.pipelines.foundations import (TOKENIZER_DATA, array_fingerprint, check_base_checkpoints,
                                            load_people, path_fingerprint, pretrain_config, pretrain_stage,
                                            pretraining_texts, public, read_jsonl, tokenizer_stage, world_inputs,
                                            world_stage, write_jsonl)
from clue_jax.pipelines.knowledge_data import Knowledge, documents_data, knowledge_splits, shot_pool, user_knowledge
from clue_jax.pipelines.stages import Stages, fingerprint


def scores_stage(config, docs_data, teachers, mesh, stage_dir):
    """Cached mode: each teacher scores every document once; epochs and resumes reuse it."""
    out = {}
    for size, model_dir in teachers.items():
        model, _ = factory.load_params(model_dir, mesh)
        scorer = scoring.make_scorer(model, mesh=mesh, dtype=config.clues.teacher_dtype,
                                     query_block=config.clues.query_block)
        out[size] = scoring.check_finite(
            scoring.score_corpus(scorer, docs_data["input_ids"], docs_data["attention_mask"],
                                 batch_size=config.clues.score_batch), f"{os.path.basename(stage_dir)} ({size} teacher)")
    if jax.process_index() == 0:
        workdir_fs.save_npz(os.path.join(stage_dir, "scores.npz"), large=out["large"], small=out["small"])
    return {"path": os.path.join(stage_dir, "scores.npz")}


def dropout_config(config, arm, tokenizer, alpha=None, beta=None) -> dropout.DropoutConfig:
    c = config.clues
    return dropout.DropoutConfig(
        method=arm, alpha=c.alpha if alpha is None else alpha, beta=c.beta if beta is None else beta,
        original_fraction=c.original_fraction,
        protected_ids=tuple(protected_token_ids(tokenizer, extra=tuple(c.protected_extra))),
        pad_id=tokenizer.pad_token_id,
    )


def live_transform(teachers: dict, drop_cfg: dropout.DropoutConfig, query_block: int, teacher_dtype=None):
    """Live mode: the frozen teachers score each batch inside the jitted step.

    Returns (transform, extras) for the Trainer; the teacher states travel as
    jit arguments (sharded like any model), under stop_gradient, in
    `teacher_dtype` as in cached mode.
    """
    graphdefs, states = {}, {}
    for size, model in teachers.items():
        graphdefs[size], states[size] = nnx.split(scoring.in_dtype(model, teacher_dtype))

    def transform(rng, batch, extras):
        scores = {}
        for size in ("large", "small"):
            teacher = nnx.merge(graphdefs[size], extras[size])
            scores[size] = scoring.received_attention(teacher, batch["input_ids"], batch["attention_mask"],
                                                      query_block)
        batch = dict(batch, scores_large=scores["large"], scores_small=scores["small"])
        return dropout.augment_batch(rng, batch, None, drop_cfg)

    return transform, states


def cpt_stage(ctx, student: str, arm: str, seed: int, knowledge_name: str, drop: dict, stage_dir: str,
              train: dict | None = None, mode: str | None = None):
    """train: overrides of cpt (steps, warmup_steps, eval_every: the replication's protocols); mode: of clues.mode.
    With train["eval_every"], the cloze EM of the documents' people is measured every that many steps
    (the learning curve, in the stage's result)."""
    config, mesh, tokenizer = ctx.config, ctx.mesh, ctx.tokenizer
    train_cfg = config.cpt.copy_and_resolve_references()
    train_cfg.update(train or {})
    train_cfg.seed = seed
    model, cfg = factory.load_params(ctx.bases[student]["model_dir"], mesh,
                                     precision=train_cfg.get("precision", "checkpoint"))
    data = dict(ctx.docs_data[knowledge_name])
    mode = mode or config.clues.mode
    drop_cfg = dropout_config(config, arm, tokenizer, **drop)
    needs_scores = arm in ("attention",) + dropout.CONTRAST_METHODS
    if needs_scores and mode in ("cached", "fixed_copies"):
        scores = workdir_fs.load_npz(ctx.scores[knowledge_name]["path"])
        data["scores_large"], data["scores_small"] = scores["large"], scores["small"]
    transform, extras = None, None
    if arm != "plain" and mode == "fixed_copies":  # the paper's offline K copies + originals
        ranking = dropout.ranking_scores(arm, data)  # "shuffled": another document's d, over the whole set
        ids, mask = dropout.fixed_copies(jax.random.key(seed), data["input_ids"], data["attention_mask"],
                                         ranking, drop_cfg, int(config.clues.copies))
        data = {"input_ids": np.asarray(ids), "attention_mask": np.asarray(mask)}
    elif arm != "plain" and mode == "live" and needs_scores:
        teachers = {s: factory.load_params(ctx.bases[s]["model_dir"], mesh)[0] for s in ("large", "small")}
        transform, extras = live_transform(teachers, drop_cfg, config.clues.query_block, config.clues.teacher_dtype)
    elif arm != "plain":
        transform = lambda rng, batch, extras: dropout.augment_batch(rng, batch, None, drop_cfg)
    data = {k: v for k, v in data.items() if transform is not None or not k.startswith("scores_")}
    replay_rows = int(config.data.get("cpt_replay_rows", 0))
    if replay_rows:
        source, transform = with_replay(ctx, data, train_cfg, replay_rows, seed, transform)
    else:
        source = ArrayBatchSource(data, train_cfg.batch_size, seed=seed)
    use_lora = config.lora.rank > 0
    if use_lora:  # the paper's students: LoRA on all projections, base frozen; the stage keeps the adapters only
        lora.apply_lora(model, config.lora.rank, config.lora.alpha, tuple(config.lora.targets), rngs=nnx.Rngs(seed))
    curve_fn = curve_recorder(ctx, knowledge_name, stage_dir, lora.merge_lora if use_lora else None) if (
        train and train.get("eval_every")) else None
    result = common.train_model(
        stage_dir, model, cfg, source, train_cfg, mesh, transform=transform, extras=extras,
        stage=os.path.basename(stage_dir), extra_meta={"arm": arm, "lora": config.lora.to_dict()},
        trainable=lora.trainable_filter(use_lora), eval_fn=curve_fn, save=functools.partial(
            lora.save_adapters, base_dir=ctx.bases[student]["model_dir"], rank=config.lora.rank,
            alpha=config.lora.alpha, targets=tuple(config.lora.targets)) if use_lora else None)
    if curve_fn is not None:
        result["curve"] = read_jsonl(os.path.join(stage_dir, "curve.jsonl"))
    return result


def curve_recorder(ctx, knowledge_name: str, stage_dir: str, export=None):
    """eval_fn for the trainer: cloze EM per attribute at a step, appended to stage_dir/curve.jsonl.

    The file outlives a preemption, so a resumed stage keeps the points measured before it stopped.
    """
    path = os.path.join(stage_dir, "curve.jsonl")
    probes = ctx.knowledge[knowledge_name].cloze or ctx.knowledge[knowledge_name].probes

    def record(model, step):
        model = export(model) if export is not None else model
        recs = qa_eval.run_probes(model, ctx.tokenizer, probes, batch_size=ctx.config.eval.batch_size,
                                  max_new_tokens=ctx.config.eval.max_new_tokens,
                                  cut_at_period=bool(ctx.knowledge[knowledge_name].cloze))
        table = qa_eval.per_attribute(recs)
        point = {"step": int(step), **{a: v["exact_match"] for a, v in table.items()}}
        if jax.process_index() == 0:
            workdir_fs.append_line(path, json.dumps(point))
        return {f"em_{a}": v for a, v in point.items() if a != "step"}

    return record


def with_replay(ctx, data: dict, train_cfg, replay_rows: int, seed: int, transform):
    """Mixes `replay_rows` rows of background text (rich bios + QA) into every batch.

    Replay keeps the base model's QA habits alive while it learns the new
    documents (a common continual-pre-training practice; the paper's protocol
    is replay 0). Dropout acts on the new-document rows only: they come first.
    """
    new_rows = train_cfg.batch_size - replay_rows
    if new_rows <= 0:
        raise UserInputError(f"data.cpt_replay_rows={replay_rows} leaves no room in cpt.batch_size={train_cfg.batch_size}")
    texts = pretraining_texts(load_people(ctx.world_dir, "background"), 1, ctx.config.seed, True)
    replay = lm_data.one_per_row(ctx.tokenizer, texts, ctx.config.cpt.seq_len, on_overflow="truncate")
    for key, value in data.items():
        if key not in replay:
            replay[key] = np.zeros((len(texts),) + value.shape[1:], value.dtype)
    source = ConcatBatchSource([(data, new_rows), (replay, replay_rows)], seed=seed)
    if transform is None:
        return source, None

    def first_rows_only(rng, batch, extras):
        head = transform(rng, {k: v[:new_rows] for k, v in batch.items()}, extras)
        return {k: jnp.concatenate([head[k], batch[k][new_rows:]]) for k in batch}

    return source, first_rows_only


def eval_stage(ctx, model_dir, knowledge: Knowledge, stage_dir):
    config = ctx.config
    model, _ = factory.load_params(model_dir, ctx.mesh)
    e = config.eval
    qa = qa_eval.run_probes(model, ctx.tokenizer, knowledge.probes, ctx.shots, k=e.k_shot if ctx.shots else 0,
                            seed=config.seed, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens)
    result = {"qa": qa_eval.per_attribute(qa), "per_person": {"qa": per_person(qa)}}
    if knowledge.cloze and e.cloze:
        cl = qa_eval.run_probes(model, ctx.tokenizer, knowledge.cloze, batch_size=e.batch_size,
                                max_new_tokens=e.max_new_tokens, cut_at_period=True)
        result["cloze"] = qa_eval.per_attribute(cl)
        result["per_person"]["cloze"] = per_person(cl)
    if knowledge.people is not None:  # the values' NLL in the intact biographies (teacher forcing)
        spans = [{a: s for a, s in bios.attribute_spans(t, p).items() if a in bios.PAPER_ATTRIBUTES}
                 for t, p in zip(knowledge.docs, knowledge.people)]
        nll = value_nll.per_attribute(model, ctx.tokenizer, knowledge.docs, spans, config.cpt.seq_len,
                                      batch_size=e.batch_size)
        result["value_nll"] = nll["table"]
        result["per_person"]["value_nll"] = nll["per_person"]
    elif knowledge.answers:  # a user corpus: each found answer's NLL in its document
        nll = corpus_probes.answer_nll(model, ctx.tokenizer, knowledge.docs, [s for s, _ in knowledge.answers],
                                       [a for _, a in knowledge.answers], config.cpt.seq_len, batch_size=e.batch_size)
        result["value_nll"] = nll["table"]
        result["per_person"]["value_nll"] = nll["per_person"]
    write_jsonl(os.path.join(stage_dir, "predictions.jsonl"), qa)
    return result


def per_person(records: list[dict]) -> dict[str, list[float]]:
    """EM per attribute in probe order (people in the split's order), for paired bootstraps across runs."""
    out: dict[str, list[float]] = {}
    for r in records:
        out.setdefault(r["attribute"], []).append(r["exact_match"])
    return out


@dataclasses.dataclass
class Context:
    config: object
    workdir: str
    mesh: object
    stages: Stages
    world_dir: str
    tokenizer: object
    bases: dict
    knowledge: dict[str, Knowledge]
    docs_data: dict[str, dict]
    scores: dict[str, dict]
    shots: dict


def prepare_stage_count(config, need_scores: bool, sizes: tuple[str, ...] = ("small", "large")) -> int:
    """How many stages `prepare` visits: world, tokenizer, each base model not given as a checkpoint, and
    (with scores) one scoring stage per split of documents (test, and dev when data.num_dev > 0)."""
    splits = 1 if config.data.source == "corpus" else 1 + (int(config.data.get("num_dev", 0)) > 0)
    pretrained = sum(1 for size in (("small", "large") if need_scores else sizes) if not config.base_models[size])
    return 2 + pretrained + (splits if need_scores else 0)


def prepare(config, workdir: str, need_scores: bool, sizes: tuple[str, ...] = ("small", "large"),
            planned: int | None = None) -> Context:
    """Everything before the students train: world, tokenizer, base models, documents, teacher scores.

    Both teachers are needed for scores; otherwise only the base models in `sizes`. Every input is
    checked before the first training step: config values, the user's files, the documents' lengths
    (right after the cheap tokenizer stage) and the checkpoints' vocabulary and positions. `planned`:
    the stages the whole run visits (Stages.expect).
    """
    validate.check_config(config)
    require_same_tokenizer({"tokenizer.path": config.tokenizer.path, "base_models.small": config.base_models.small,
                            "base_models.large": config.base_models.large if need_scores else ""})
    user = user_knowledge(config) if config.data.source == "corpus" else None
    mesh = common.make_mesh(config)
    stages = Stages(workdir)
    if planned is not None:
        stages.expect(planned)
    world = stages.run("world", {"world": world_inputs(config)}, lambda d: world_stage(config, d))
    world_dir = stages.path("world")
    tok_res = stages.run("tokenizer", {"world": world["_fingerprint"], "tokenizer": config.tokenizer.to_dict(),
                                       "data": TOKENIZER_DATA, "seed": config.seed,
                                       "base_models": config.base_models.to_dict()},
                         lambda d: tokenizer_stage(config, world_dir, d))
    tokenizer = load_tokenizer(tok_res["path"])
    knowledge = {"test": user} if user is not None else knowledge_splits(config, world_dir)
    docs_data = {k: documents_data(tokenizer, v, config.cpt.seq_len) for k, v in knowledge.items()}
    check_base_checkpoints(config, tokenizer)

    bases = {}
    for size in ("small", "large") if need_scores else sizes:
        if config.base_models[size]:  # a pretrained checkpoint (HF directory) replaces pre-training
            path = workdir_fs.absolute(config.base_models[size])
            bases[size] = {"model_dir": path, "_fingerprint": path_fingerprint(path)}
            continue
        inputs = {"tokenizer": tok_res["_fingerprint"], "model": config.models[size].to_dict(),
                  "train": pretrain_config(config, size).to_dict(), "seed": config.seed,
                  "data": [config.data.bios_per_person, config.data.pretrain_qa]}
        bases[size] = stages.run(f"pretrain_{size}", inputs,
                                 lambda d, s=size: pretrain_stage(config, s, background_texts(config, world_dir),
                                                                  tokenizer, mesh, d))

    scores = {}
    if need_scores:
        teachers = {s: bases[s]["model_dir"] for s in ("small", "large")}
        for name, data in docs_data.items():
            inputs = {"small": bases["small"]["_fingerprint"], "large": bases["large"]["_fingerprint"],
                      "docs": array_fingerprint(data), "dtype": config.clues.teacher_dtype}
            scores[name] = stages.run(f"scores_{name}", inputs,
                                      lambda d, x=data: scores_stage(config, x, teachers, mesh, d))
    shots = shot_pool(world_dir) if config.data.source == "bios" else {}
    return Context(config, workdir, mesh, stages, world_dir, tokenizer, bases, knowledge, docs_data, scores, shots)


def background_texts(config, world_dir: str) -> list[str]:
    """The base models' pre-training corpus: rich bios of the background people (+ their QA, data.pretrain_qa)."""
    return pretraining_texts(load_people(world_dir, "background"), config.data.bios_per_person, config.seed,
                             config.data.pretrain_qa)


def train_and_evaluate(ctx: Context, student: str, arm: str, seed: int, split: str = "test",
                       drop: dict | None = None, tag: str = "", train: dict | None = None,
                       mode: str | None = None) -> dict:
    """One arm: continual pre-training of `student` on `split`'s documents, then its QA/cloze tables.

    train/mode: overrides of cpt and clues.mode (see cpt_stage). Plain's stage does not depend on the
    dropout settings, so every protocol and grid point with the same steps shares one plain run.
    """
    config = ctx.config
    drop = drop or {}
    name = f"{student}_{arm}{tag}_s{seed}" + ("" if split == "test" else f"_{split}")
    dropping = arm != "plain"
    inputs = {"base": ctx.bases[student]["_fingerprint"], "scores": ctx.scores.get(split, {}).get("_fingerprint"),
              "arm": arm, "seed": seed, "train": {**config.cpt.to_dict(), **(train or {})},
              "clues": config.clues.to_dict() if dropping else None, "mode": mode if dropping else None,
              "drop": drop, "lora": config.lora.to_dict(), "docs": array_fingerprint(ctx.docs_data[split]),
              "replay": config.data.cpt_replay_rows}
    stage = ctx.stages.run(f"cpt_{name}", inputs,
                           lambda d: cpt_stage(ctx, student, arm, seed, split, drop, d, train, mode))
    result = evaluate(ctx, name, stage, split)
    result["train"] = public(stage)
    return result


def evaluate(ctx: Context, name: str, model_stage: dict, split: str = "test") -> dict:
    knowledge = ctx.knowledge[split]
    inputs = {"model": model_stage["_fingerprint"], "eval": ctx.config.eval.to_dict(),
              "probes": fingerprint([repr(p) for p in knowledge.probes]), "seed": ctx.config.seed}
    if knowledge.people is None:  # a user corpus's cloze probes and answers come from its documents
        inputs["cloze"] = fingerprint([repr(p) for p in knowledge.cloze] + [repr(a) for a in knowledge.answers or []])
    res = ctx.stages.run(f"eval_{name}", inputs, lambda d: eval_stage(ctx, model_stage["model_dir"], knowledge, d))
    return public(res)


def stage_records(stages) -> dict[str, dict]:
    """Each stage of this run: "ran" or "reused", and its result as its done.json holds it."""
    records = {}
    for status, names in (("ran", stages.ran), ("reused", stages.reused)):
        for name in names:
            record = json.loads(workdir_fs.read_text(os.path.join(stages.path(name), "done.json")))
            records[name] = {"status": status, "result": public(record["result"])}
    return records
