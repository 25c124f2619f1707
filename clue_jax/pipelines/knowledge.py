"""Knowledge learning: pre-train base models, continual-pretrain on new facts, test recall.

Stages (each cached in workdir/stages, see stages.py):
  world -> tokenizer -> pretrain_small, pretrain_large (background people:
  rich bios + their QA, so the base models know the QA format; or HF
  checkpoints from `base_models`) -> scores (both teachers read the new
  documents once: clue dropout's cached mode) -> cpt_<student>_<arm>_s<seed>
  (a base model learns the new documents, with the arm's dropout drawn fresh
  every step) -> eval_<name> (k-shot QA and cloze on the new people, EM/F1
  per attribute). `summary.json` holds every table; the quickstart prints one.

`prepare` and `train_and_evaluate` are shared with the replication pipeline.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clue_jax import paths, workdir_fs
from clue_jax.clues import analysis, dropout, render, scoring
from clue_jax.data import bios, corpus, lm_data
from clue_jax.data.batching import ArrayBatchSource, ConcatBatchSource
from clue_jax.data.tokenizer import load_tokenizer, protected_token_ids, require_same_tokenizer, train_bpe_tokenizer
from clue_jax.errors import UserInputError
from clue_jax.eval import qa_eval, value_nll
from clue_jax.models import factory, lora, precision
from clue_jax.models.config import ModelConfig
from clue_jax.pipelines import common, protocol, validate
from clue_jax.pipelines.stages import Stages, fingerprint
from clue_jax.pipelines.validate import ARMS, MODES  # noqa: F401  (kept importable from here)
from clue_jax.train import logging_utils

log = logging.getLogger("clue_jax")


# ------------------------------------------------------------------ documents
def read_jsonl(path):
    return [json.loads(line) for line in workdir_fs.read_text(path).splitlines()]


def write_jsonl(path, rows):
    if jax.process_index() == 0:
        with workdir_fs.open_write(path) as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def world_stage(config, stage_dir):
    world = bios.build_world(bios.WorldConfig(**config.world.to_dict()))
    for split in ("background", "new"):
        write_jsonl(os.path.join(stage_dir, f"{split}.jsonl"), bios.world_records(world, split))
    return {"background": len(world.background), "new": len(world.new)}


def load_people(world_dir, split):
    return [bios.person_from_record(r) for r in read_jsonl(os.path.join(world_dir, f"{split}.jsonl"))]


def pretraining_texts(people, bios_per_person: int, seed: int, with_qa: bool) -> list[str]:
    """Mixed training (Allen-Zhu & Li): several rich bios per person plus their QA pairs."""
    texts = []
    for i, person in enumerate(people):
        rng = np.random.default_rng([seed, i])
        texts.extend(bios.rich_bio(person, rng) for _ in range(bios_per_person))
        if with_qa:
            texts.extend(f"{item.question}{item.target}" for item in bios.qa_items(person))
    order = np.random.default_rng(seed).permutation(len(texts))
    return [texts[i] for i in order]


@dataclasses.dataclass
class Knowledge:
    """The documents to learn and the probes that test them (one split of people)."""

    docs: list[str]
    probes: list[qa_eval.Probe]
    cloze: list[qa_eval.Probe]
    people: list | None  # bios.Person per doc for the built-in world, else None
    where: list[str] | None = None  # "file:line" per doc of a user corpus, for error messages


def people_knowledge(people) -> Knowledge:
    keep = bios.PAPER_ATTRIBUTES  # company_city is not in the paper's template, so it cannot be learned
    return Knowledge(
        docs=[bios.paper_bio(p) for p in people],
        probes=[qa_eval.Probe(q.question, q.answer, q.attribute, q.name)
                for p in people for q in bios.qa_items(p) if q.attribute in keep],
        cloze=[qa_eval.Probe(q.question, q.answer, q.attribute, q.name)
               for p in people for q in bios.cloze_items(p) if q.attribute in keep],
        people=list(people),
    )


def user_knowledge(config) -> Knowledge:
    """The user's documents and questions, read and checked whole (errors name file, line and config key)."""
    try:
        rows = corpus.corpus_documents(config.data.corpus)
    except UserInputError as err:
        raise UserInputError(f"{err} (--config.data.corpus)") from None
    try:
        qa = corpus.read_qa_jsonl(config.data.qa_file)
    except UserInputError as err:
        raise UserInputError(f"{err} (--config.data.qa_file)") from None
    probes = [qa_eval.Probe(r["question"], r["answer"], r.get("attribute", "all"), r.get("name", "")) for r in qa]
    return Knowledge([doc for _, doc in rows], probes, [], None, [f"{config.data.corpus}:{n}" for n, _ in rows])


def knowledge_splits(config, world_dir) -> dict[str, Knowledge]:
    """'test' (and 'dev' for hyper-parameter choice): the new people, or the user's corpus + QA file."""
    if config.data.source == "corpus":
        return {"test": user_knowledge(config)}
    people = load_people(world_dir, "new")
    n_dev = int(config.data.get("num_dev", 0))
    if n_dev >= len(people):
        raise UserInputError(f"data.num_dev={n_dev} leaves no test people out of world.num_new={len(people)}")
    splits = {"test": people_knowledge(people[n_dev:])}
    if n_dev:
        splits["dev"] = people_knowledge(people[:n_dev])
    return splits


def shot_pool(world_dir):
    pool: dict[str, list[tuple[str, str]]] = {}
    for person in load_people(world_dir, "background"):
        for item in bios.qa_items(person):
            pool.setdefault(item.attribute, []).append((item.question, item.answer))
    return pool


# ------------------------------------------------------------------ stages
def tokenizer_stage(config, world_dir, stage_dir):
    """Process 0 writes the tokenizer (the Stages barrier then lets the others read it)."""
    if jax.process_index() != 0:
        return {"path": stage_dir}
    path = config.tokenizer.path or config.base_models.small
    with workdir_fs.local_dir_for(stage_dir) as local:  # save_pretrained writes local files; uploaded when remote
        if path:
            tok = load_tokenizer(paths.local_dir(path))  # a URL (gs://...) is read through the local cache
            tok.save_pretrained(local)
        else:  # the built-in world only, also under a user corpus: see TOKENIZER_DATA
            texts = pretraining_texts(load_people(world_dir, "background"), 2, config.seed, True)
            texts += [bios.paper_bio(p) for p in load_people(world_dir, "new")]
            tok = train_bpe_tokenizer(texts, config.tokenizer.vocab_size, local)
    return {"path": stage_dir, "vocab_size": len(tok)}


# What a trained tokenizer learns from: the built-in world's text, whatever data.source is. The base models
# pre-train on that world, so tokens merged only from a user's corpus would have embeddings no base model ever
# trained; and a new corpus then leaves the tokenizer and both base models' fingerprints unchanged (reused).
# (The value is the one bios runs always had, so their workdirs keep their stages.)
TOKENIZER_DATA = ["bios", ""]


def documents_data(tokenizer, knowledge: Knowledge, seq_len: int) -> dict[str, np.ndarray]:
    """One document per row; a document longer than cpt.seq_len names its file and line and the longest one."""
    lengths = [len(ids) + 2 for ids in tokenizer(knowledge.docs, add_special_tokens=False)["input_ids"]]  # bos, eos
    too_long = [i for i, n in enumerate(lengths) if n > seq_len]
    if too_long:
        name = lambda i: knowledge.where[i] if knowledge.where else f"new person {i + 1}'s biography"
        first, longest = too_long[0], int(np.argmax(lengths))
        raise UserInputError(
            f"{name(first)}: document has {lengths[first]} tokens (with <bos> and <eos>), more than "
            f"cpt.seq_len={seq_len}; {len(too_long)} of {len(lengths)} documents are too long, the longest "
            f"({name(longest)}) has {lengths[longest]}: raise --config.cpt.seq_len to at least {lengths[longest]}")
    return lm_data.one_per_row(tokenizer, knowledge.docs, seq_len)


def check_base_checkpoints(config, tokenizer) -> None:
    """Checkpoints given as base_models must fit the tokenizer and cpt.seq_len (read from their config only)."""
    for size, path in config.base_models.items():
        if path:
            factory.check_fits(factory.read_config(path), tokens=len(tokenizer), seq_len=config.cpt.seq_len,
                               model=f"base_models.{size}={path}", seq_key="cpt.seq_len")


def model_config(config, size: str, tokenizer) -> ModelConfig:
    values = config.models[size].to_dict()
    values["vocab_size"] = len(tokenizer)
    return ModelConfig.from_dict(values, where=f"models.{size}")


def pretrain_stage(config, size, world_dir, tokenizer, mesh, stage_dir):
    train_cfg = pretrain_config(config, size)
    cfg = precision.model_config(model_config(config, size, tokenizer), train_cfg.get("precision", "checkpoint"))
    texts = pretraining_texts(load_people(world_dir, "background"), config.data.bios_per_person,
                              config.seed, config.data.pretrain_qa)
    data = lm_data.pack_documents(tokenizer, texts, config.pretrain.seq_len)
    model = factory.create(cfg, config.seed, mesh)
    source = ArrayBatchSource(data, train_cfg.batch_size, seed=train_cfg.seed)
    result = common.train_model(stage_dir, model, cfg, source, train_cfg, mesh, stage=f"pretrain_{size}")
    result["tokens_per_epoch"] = int(data["attention_mask"].sum())
    return result


def pretrain_config(config, size: str):
    """config.pretrain, with the base model's own steps from pretrain_steps (the teacher pair's gap) if given."""
    train_cfg = config.pretrain.copy_and_resolve_references()
    steps = config.get("pretrain_steps", {}).get(size)
    if steps:
        train_cfg.steps = int(steps)
    return train_cfg


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
    if use_lora:  # the paper's students: LoRA on all projections, base frozen, merged on export
        lora.apply_lora(model, config.lora.rank, config.lora.alpha, tuple(config.lora.targets), rngs=nnx.Rngs(seed))
    curve_fn = curve_recorder(ctx, knowledge_name, stage_dir, lora.merge_lora if use_lora else None) if (
        train and train.get("eval_every")) else None
    result = common.train_model(
        stage_dir, model, cfg, source, train_cfg, mesh, transform=transform, extras=extras,
        stage=os.path.basename(stage_dir), extra_meta={"arm": arm, "lora": config.lora.to_dict()},
        trainable=lora.trainable_filter(use_lora), export=lora.merge_lora if use_lora else None, eval_fn=curve_fn)
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
    write_jsonl(os.path.join(stage_dir, "predictions.jsonl"), qa)
    return result


def per_person(records: list[dict]) -> dict[str, list[float]]:
    """EM per attribute in probe order (people in the split's order), for paired bootstraps across runs."""
    out: dict[str, list[float]] = {}
    for r in records:
        out.setdefault(r["attribute"], []).append(r["exact_match"])
    return out


# ------------------------------------------------------------------ context
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


def array_fingerprint(arrays: dict) -> str:
    """Content hash of token arrays, so edited data reruns what reads it."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()[:16]


def path_fingerprint(path: str) -> str:
    """Names a user checkpoint by its files' sizes and times, so replacing it reruns what depends on it."""
    if paths.is_remote(path):
        return fingerprint(paths.file_versions(path))
    if not os.path.isdir(path):
        raise UserInputError(f"base model directory not found: {path}")
    return fingerprint(sorted((f, os.path.getsize(os.path.join(path, f)), int(os.path.getmtime(os.path.join(path, f))))
                              for f in os.listdir(path)))


def prepare(config, workdir: str, need_scores: bool, sizes: tuple[str, ...] = ("small", "large")) -> Context:
    """Everything before the students train: world, tokenizer, base models, documents, teacher scores.

    Both teachers are needed for scores; otherwise only the base models in `sizes`. Every input is
    checked before the first training step: config values, the user's files, the documents' lengths
    (right after the cheap tokenizer stage) and the checkpoints' vocabulary and positions.
    """
    validate.check_config(config)
    require_same_tokenizer({"tokenizer.path": config.tokenizer.path, "base_models.small": config.base_models.small,
                            "base_models.large": config.base_models.large if need_scores else ""})
    user = user_knowledge(config) if config.data.source == "corpus" else None
    mesh = common.make_mesh(config)
    stages = Stages(workdir)
    world = stages.run("world", {"world": config.world.to_dict()}, lambda d: world_stage(config, d))
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
            path = paths.absolute(config.base_models[size])
            bases[size] = {"model_dir": path, "_fingerprint": path_fingerprint(path)}
            continue
        inputs = {"tokenizer": tok_res["_fingerprint"], "model": config.models[size].to_dict(),
                  "train": pretrain_config(config, size).to_dict(), "seed": config.seed,
                  "data": [config.data.bios_per_person, config.data.pretrain_qa]}
        bases[size] = stages.run(f"pretrain_{size}", inputs,
                                 lambda d, s=size: pretrain_stage(config, s, world_dir, tokenizer, mesh, d))

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
    result["train"] = _public(stage)
    return result


def evaluate(ctx: Context, name: str, model_stage: dict, split: str = "test") -> dict:
    knowledge = ctx.knowledge[split]
    inputs = {"model": model_stage["_fingerprint"], "eval": ctx.config.eval.to_dict(),
              "probes": fingerprint([repr(p) for p in knowledge.probes]), "seed": ctx.config.seed}
    res = ctx.stages.run(f"eval_{name}", inputs, lambda d: eval_stage(ctx, model_stage["model_dir"], knowledge, d))
    return _public(res)


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_") and k != "model_dir"}


# ------------------------------------------------------------------ clue views
def _token_offsets(tokenizer, text: str):
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]


def clue_analysis(ctx: Context, split: str = "test", far_attribute: str = "company") -> dict:
    """The paper's analysis: are the name tokens the clues the large model uses?

    - share of name tokens among the top-10 contrast tokens d = s_large - s_small
      of each biography (and the chance level);
    - seen from far: for the query just before the `far_attribute` value, the
      keys the large teacher attends to more than the small one; share of name
      tokens among the top 10 (and chance).
    """
    knowledge = ctx.knowledge[split]
    if knowledge.people is None or split not in ctx.scores:
        return {}
    data = ctx.docs_data[split]
    scores = workdir_fs.load_npz(ctx.scores[split]["path"])
    ids, mask = data["input_ids"], data["attention_mask"]
    name_mask = np.zeros_like(mask)
    query = np.zeros(len(ids), np.int32)
    for i, (text, person) in enumerate(zip(knowledge.docs, knowledge.people)):
        offsets = _token_offsets(ctx.tokenizer, text)
        start = bios.attribute_spans(text, person)[far_attribute][0]
        for j, (a, b) in enumerate(offsets):
            if a < len(person.name):
                name_mask[i, j + 1] = 1  # +1: BOS at position 0
        first_value_token = next(j for j, (a, b) in enumerate(offsets) if b > start)
        query[i] = first_value_token  # row index of the token just before the value (BOS shift cancels)
    d = scores["large"] - scores["small"]
    rows = {}
    for size in ("large", "small"):
        model, _ = factory.load_params(ctx.bases[size]["model_dir"], ctx.mesh)
        rows[size] = np.asarray(jax.jit(lambda m, i, k, q: scoring.attention_from_query(m, i, k, q))(
            model, ids, mask, query))
    bos = (ids == ctx.tokenizer.bos_token_id).astype(np.int32)
    far = analysis.top_tokens_from_query(rows["large"], rows["small"], mask, query, k=10,
                                         name_token_mask=name_mask, exclude_mask=bos)
    chance = analysis.chance_per_example(mask * (1 - bos), name_mask, query)
    return {
        "name_share_top10_contrast": analysis.name_share_in_top_contrast(d, mask, name_mask, k=10),
        "name_share_chance": analysis.name_share_by_chance(mask, name_mask),
        f"name_share_top10_from_{far_attribute}": far["name_share"],
        f"name_share_chance_from_{far_attribute}": float(np.nanmean(chance)),
        "per_document": {"shares": far["shares"].tolist(), "chance": chance.tolist()},
    }


def render_clue_examples(ctx: Context, n: int, split: str = "test") -> list[str]:
    """Writes HTML and PNG views of s_large, s_small and d for the first n documents."""
    if n <= 0 or split not in ctx.scores or jax.process_index() != 0:
        return []
    out_dir = workdir_fs.join(ctx.workdir, "clues")
    workdir_fs.path(out_dir).mkdir(parents=True, exist_ok=True)
    scores = workdir_fs.load_npz(ctx.scores[split]["path"])
    data = ctx.docs_data[split]
    people = ctx.knowledge[split].people
    paths = []
    for i in range(min(n, len(data["input_ids"]))):
        who = people[i].name if people is not None else f"document {i}"  # a user corpus has no people
        length = int(data["attention_mask"][i].sum())
        ids = data["input_ids"][i, :length]
        tokens = [ctx.tokenizer.decode([int(t)]) for t in ids]
        large, small = scores["large"][i, :length], scores["small"][i, :length]
        base = os.path.join(out_dir, f"example_{i}")
        render.render_html(tokens, large, small, large - small, base + ".html", title=f"clues: {who}")
        render.render_heatmap_png(tokens, large, small, large - small, base + ".png", title=f"clues: {who}")
        paths += [base + ".html", base + ".png"]
    return paths


# ------------------------------------------------------------------ pipeline
def run(config, workdir: str) -> dict:
    arms = list(config.clues.arms)
    ctx = prepare(config, workdir, need_scores=any(a in ("attention",) + dropout.CONTRAST_METHODS for a in arms)
                  or config.clues.render_examples > 0, sizes=("small",))
    summary = {"models": {}, "stages": {}, "data": data_description(ctx)}
    summary["models"]["base_small"] = evaluate(ctx, "base_small", ctx.bases["small"])
    chosen = config.clues.get("chosen", {})
    for seed in config.seeds:
        for arm in arms:
            drop = dict(chosen.get(arm, {}))
            if "protocol" in config:  # each arm's steps by the protocol (paper: dropout arms K + 1 times plain's)
                settings = protocol.arm_settings(config, config.protocol.names[0], arm, len(ctx.knowledge["test"].docs))
                summary["models"][f"{arm}_s{seed}"] = train_and_evaluate(ctx, "small", arm, seed, drop=drop,
                                                                         **settings)
            else:
                summary["models"][f"{arm}_s{seed}"] = train_and_evaluate(ctx, "small", arm, seed, drop=drop)
    summary["distance_from_name"] = name_distances(ctx)
    summary["clue_views"] = render_clue_examples(ctx, config.clues.render_examples)
    summary["stages_reused"] = ctx.stages.reused
    summary["stages_ran"] = ctx.stages.ran
    summary["stages"] = stage_records(ctx.stages)
    logging_utils.write_summary(workdir, summary)
    logging_utils.write_eval_scalars(workdir, {name: {k: v for k, v in res.items() if k != "per_person"}
                                               for name, res in summary["models"].items()})
    if jax.process_index() == 0:
        print(render_table(summary, arms, list(config.seeds)))
        print(measured_sentence(summary, arms, list(config.seeds)))
    return summary


def measured_sentence(summary: dict, arms: list[str], seeds: list[int], far=("university", "major", "company")) -> str:
    """One sentence of what the run measured: each arm's mean EM on the far attributes, and its training steps."""
    probe = "cloze" if "cloze" in summary["models"]["base_small"] else "qa"
    parts = []
    for arm in arms:
        runs = [summary["models"][f"{arm}_s{s}"] for s in seeds]
        attrs = [a for a in far if a in runs[0][probe]] or ["all"]
        em = np.mean([r[probe][a]["exact_match"] for r in runs for a in attrs])
        parts.append(f"{arm} {em:.2f} ({runs[0]['train']['steps']} steps)")
    return (f"Measured: mean {probe} exact match on the far attributes ({', '.join(attrs)}) of the new people, "
            f"{len(seeds)} seed(s): " + ", ".join(parts) + ".")


def stage_records(stages) -> dict[str, dict]:
    """Each stage of this run: "ran" or "reused", and its result as its done.json holds it."""
    records = {}
    for status, names in (("ran", stages.ran), ("reused", stages.reused)):
        for name in names:
            record = json.loads(workdir_fs.read_text(os.path.join(stages.path(name), "done.json")))
            records[name] = {"status": status, "result": _public(record["result"])}
    return records


def name_distances(ctx: Context, split: str = "test") -> dict[str, float]:
    knowledge = ctx.knowledge[split]
    if knowledge.people is None:
        return {}
    rows = [(text, len(p.name), bios.attribute_spans(text, p)) for text, p in zip(knowledge.docs, knowledge.people)]
    return qa_eval.token_distances(ctx.tokenizer, rows)


def token_lengths(ctx: Context, split: str = "test") -> dict[str, float]:
    """Mean length in tokens of the name and of each attribute value, as written inside the biographies."""
    knowledge = ctx.knowledge[split]
    if knowledge.people is None:
        return {}
    lengths: dict[str, list[int]] = {}
    for text, person in zip(knowledge.docs, knowledge.people):
        spans = {"name": (0, len(person.name)), **bios.attribute_spans(text, person)}
        for attr, span in spans.items():
            lengths.setdefault(attr, []).append(len(value_nll.value_positions(ctx.tokenizer, text, span)))
    return {a: float(np.mean(v)) for a, v in lengths.items()}


def data_description(ctx: Context) -> dict:
    """What the tables are about: the new people of the built-in world, or the user's files; and the shots.

    A user corpus is asked zero-shot: its QA file has no separate examples to show, and the built-in
    world's questions would teach another format.
    """
    config = ctx.config
    test = ctx.knowledge["test"]
    k = config.eval.k_shot if ctx.shots else 0
    if config.data.source == "corpus":
        corpus_name, qa_name = os.path.basename(config.data.corpus), os.path.basename(config.data.qa_file)
        return {"source": "corpus", "k_shot": k, "documents": len(test.docs), "questions": len(test.probes),
                "title": f"your documents ({corpus_name}, {len(test.docs)} documents)",
                "qa": f"{k}-shot: the {len(test.probes)} questions of {qa_name}, asked as written"}
    return {"source": "bios", "k_shot": k, "documents": len(test.docs), "questions": len(test.probes),
            "title": "new people", "qa": f"{k}-shot 'What is the company of {{name}}?'"}


def render_table(summary: dict, arms: list[str], seeds: list[int]) -> str:
    """EM per attribute (ordered by distance from the name) for each model, mean (± std) over seeds:
    one table for the cloze probes and one for k-shot QA, headed with the data they test."""
    dist = summary.get("distance_from_name") or {}
    data = summary.get("data") or {"title": "new people", "qa": "k-shot 'What is the company of {name}?'"}
    out = []
    for probe, title in (("cloze", "Cloze exact match ('{name} had a professional role at')"),
                         ("qa", f"QA exact match ({data['qa']})")):
        any_model = next(iter(summary["models"].values()))
        if probe not in any_model:
            continue
        attrs = sorted((a for a in any_model[probe] if a != "all"), key=lambda a: dist.get(a, 0.0))
        header = ["model"] + [f"{a} ({dist[a]:.0f} tok)" if a in dist else a for a in attrs] + ["all"]
        rows = []
        for name in ["base_small"] + arms:
            keys = [name] if name == "base_small" else [f"{name}_s{s}" for s in seeds]
            tables = [summary["models"][k][probe] for k in keys if k in summary["models"]]
            if tables:
                rows.append([name] + [mean_std([t[a]["exact_match"] for t in tables]) for a in attrs + ["all"]])
        out.append(f"{title}, {data['title']}:\n" + common.format_table(rows, header))
    return "\n\n".join(out)


def mean_std(values) -> str:
    """'mean ± sample std' (ddof=1, as over seeds); the mean alone for one value."""
    return f"{np.mean(values):.2f}" + (f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else "")
