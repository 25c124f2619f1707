"""Knowledge learning: pre-train base models, continual-pretrain on new facts, test recall.

Stages (each cached in workdir/stages, see stages.py):
  world -> tokenizer -> pretrain_small, pretrain_large (background people:
  rich bios + their QA, so the base models know the QA format) -> scores
  (both teachers read the new documents once; clue dropout's cached mode)
  -> cpt_<arm>_s<seed> (the small base model learns the new documents, with
  the arm's dropout drawn fresh every step) -> eval_<model> (k-shot QA and
  cloze on the new people, EM/F1 per attribute). summary.json holds every
  table; the quickstart prints one.
"""
from __future__ import annotations

import logging
import os

import jax
import numpy as np
from flax import nnx

from clue_jax.clues import dropout, scoring
from clue_jax.data import bios, corpus, lm_data
from clue_jax.data.batching import ArrayBatchSource
from clue_jax.data.tokenizer import load_tokenizer, protected_token_ids, train_bpe_tokenizer
from clue_jax.errors import UserInputError
from clue_jax.eval import qa_eval
from clue_jax.models import factory, lora
from clue_jax.models.config import ModelConfig
from clue_jax.pipelines import common
from clue_jax.pipelines.stages import Stages

log = logging.getLogger("clue_jax")

ARMS = ("plain", "random", "attention", "contrast")


# ------------------------------------------------------------------ documents
def _read_jsonl(path):
    import json

    with open(path) as f:
        return [json.loads(line) for line in f]


def _write_jsonl(path, rows):
    import json

    if jax.process_index() == 0:
        with open(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def world_stage(config, stage_dir):
    world = bios.build_world(bios.WorldConfig(**config.world.to_dict()))
    for split in ("background", "new"):
        _write_jsonl(os.path.join(stage_dir, f"{split}.jsonl"), bios.world_records(world, split))
    return {"background": len(world.background), "new": len(world.new)}


def load_people(world_dir, split):
    return [bios.person_from_record(r) for r in _read_jsonl(os.path.join(world_dir, f"{split}.jsonl"))]


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


def knowledge_documents(config, world_dir):
    """The new facts to learn and their probes: the new people, or the user's corpus + QA file."""
    if config.data.source == "corpus":
        docs = corpus.read_text_corpus(config.data.corpus)
        probes = [qa_eval.Probe(r["question"], r["answer"], r.get("attribute", "all"), r.get("name", ""))
                  for r in corpus.read_qa_jsonl(config.data.qa_file)]
        return docs, probes, []
    if config.data.source != "bios":
        raise UserInputError(f"data.source={config.data.source!r} is not 'bios' or 'corpus'")
    people = load_people(world_dir, "new")
    docs = [bios.paper_bio(p) for p in people]
    probes = [qa_eval.Probe(q.question, q.answer, q.attribute, q.name)
              for p in people for q in bios.qa_items(p) if q.attribute in bios.PAPER_ATTRIBUTES]
    cloze = [qa_eval.Probe(q.question, q.answer, q.attribute, q.name)
             for p in people for q in bios.cloze_items(p) if q.attribute in bios.PAPER_ATTRIBUTES]
    return docs, probes, cloze


def shot_pool(world_dir):
    pool: dict[str, list[tuple[str, str]]] = {}
    for person in load_people(world_dir, "background"):
        for item in bios.qa_items(person):
            pool.setdefault(item.attribute, []).append((item.question, item.answer))
    pool["all"] = [s for a in bios.PAPER_ATTRIBUTES for s in pool[a]]
    return pool


# ------------------------------------------------------------------ stages
def tokenizer_stage(config, world_dir, stage_dir):
    path = config.tokenizer.path or config.base_models.small
    if path:
        tok = load_tokenizer(path)
        tok.save_pretrained(stage_dir)
    else:
        texts = pretraining_texts(load_people(world_dir, "background"), 2, config.seed, True)
        texts += [bios.paper_bio(p) for p in load_people(world_dir, "new")]
        if config.data.source == "corpus":
            texts += corpus.read_text_corpus(config.data.corpus)
        tok = train_bpe_tokenizer(texts, config.tokenizer.vocab_size, stage_dir)
    return {"path": stage_dir, "vocab_size": len(tok)}


def model_config(config, size: str, tokenizer) -> ModelConfig:
    values = config.models[size].to_dict()
    values["vocab_size"] = len(tokenizer)
    return ModelConfig.from_dict(values, where=f"models.{size}")


def pretrain_stage(config, size, world_dir, tokenizer, mesh, stage_dir):
    cfg = model_config(config, size, tokenizer)
    texts = pretraining_texts(load_people(world_dir, "background"), config.data.bios_per_person,
                              config.seed, config.data.pretrain_qa)
    data = lm_data.pack_documents(tokenizer, texts, config.pretrain.seq_len)
    train_cfg = config.pretrain
    model = factory.create(cfg, config.seed, mesh)
    source = ArrayBatchSource(data, train_cfg.batch_size, seed=train_cfg.seed)
    result = common.train_model(stage_dir, model, cfg, source, train_cfg, mesh, stage=f"pretrain_{size}")
    result["tokens_per_epoch"] = int(data["attention_mask"].sum())
    return result


def scores_stage(config, docs_data, teachers, mesh, stage_dir):
    """Cached mode: each teacher scores every document once; epochs and resumes reuse it."""
    out = {}
    for size, model_dir in teachers.items():
        model, _ = factory.load_params(model_dir, mesh)
        scorer = scoring.make_scorer(model, mesh=mesh, dtype=config.clues.teacher_dtype,
                                     query_block=config.clues.query_block)
        out[size] = scoring.score_corpus(scorer, docs_data["input_ids"], docs_data["attention_mask"],
                                         batch_size=config.clues.score_batch)
    if jax.process_index() == 0:
        np.savez(os.path.join(stage_dir, "scores.npz"), large=out["large"], small=out["small"])
    return {"path": os.path.join(stage_dir, "scores.npz")}


def dropout_config(config, arm, tokenizer) -> dropout.DropoutConfig:
    c = config.clues
    return dropout.DropoutConfig(
        method=arm, alpha=c.alpha, beta=c.beta, original_fraction=c.original_fraction,
        protected_ids=tuple(protected_token_ids(tokenizer, extra=tuple(c.protected_extra))),
        pad_id=tokenizer.pad_token_id,
    )


def cpt_stage(config, arm, seed, docs_data, scores_path, base_dir, tokenizer, mesh, stage_dir):
    model, cfg = factory.load_params(base_dir, mesh)
    arrays = dict(docs_data)
    if arm in ("attention", "contrast"):
        scores = np.load(scores_path)
        arrays["scores_large"], arrays["scores_small"] = scores["large"], scores["small"]
    train_cfg = config.cpt.copy_and_resolve_references()
    train_cfg.seed = seed
    drop_cfg = dropout_config(config, arm, tokenizer)
    transform = None if arm == "plain" else (lambda rng, batch, extras: dropout.augment_batch(rng, batch, None, drop_cfg))
    source = ArrayBatchSource(arrays, train_cfg.batch_size, seed=seed)
    use_lora = config.lora.rank > 0
    if use_lora:  # the paper's students: LoRA on all projections, base frozen, merged on export
        lora.apply_lora(model, config.lora.rank, config.lora.alpha, tuple(config.lora.targets), rngs=nnx.Rngs(seed))
    return common.train_model(stage_dir, model, cfg, source, train_cfg, mesh, transform=transform,
                              stage=f"cpt_{arm}_s{seed}", extra_meta={"arm": arm, "lora": config.lora.to_dict()},
                              trainable=lora.trainable_filter(use_lora),
                              export=lora.merge_lora if use_lora else None)


def eval_stage(config, model_dir, tokenizer, probes, cloze, shots, mesh, stage_dir):
    model, _ = factory.load_params(model_dir, mesh)
    e = config.eval
    qa = qa_eval.run_probes(model, tokenizer, probes, shots, k=e.k_shot, seed=config.seed,
                            batch_size=e.batch_size, max_new_tokens=e.max_new_tokens)
    result = {"qa": qa_eval.per_attribute(qa)}
    if cloze and e.cloze:
        cl = qa_eval.run_probes(model, tokenizer, cloze, batch_size=e.batch_size,
                                max_new_tokens=e.max_new_tokens, cut_at_period=True)
        result["cloze"] = qa_eval.per_attribute(cl)
    _write_jsonl(os.path.join(stage_dir, "predictions.jsonl"), qa)
    return result


# ------------------------------------------------------------------ pipeline
def run(config, workdir: str) -> dict:
    mesh = common.make_mesh(config)
    stages = Stages(workdir)
    world = stages.run("world", {"world": config.world.to_dict()}, lambda d: world_stage(config, d))
    world_dir = stages.path("world")
    tok_res = stages.run("tokenizer", {"world": world["_fingerprint"], "tokenizer": config.tokenizer.to_dict(),
                                       "data": config.data.to_dict(), "seed": config.seed,
                                       "base_models": config.base_models.to_dict()},
                         lambda d: tokenizer_stage(config, world_dir, d))
    tokenizer = load_tokenizer(tok_res["path"])

    bases = {}
    for size in ("small", "large"):
        if config.base_models[size]:  # a pretrained checkpoint (HF directory) replaces pre-training
            path = os.path.abspath(config.base_models[size])
            bases[size] = {"model_dir": path, "_fingerprint": _path_fingerprint(path)}
            continue
        inputs = {"tokenizer": tok_res["_fingerprint"], "model": config.models[size].to_dict(),
                  "train": config.pretrain.to_dict(), "data": config.data.to_dict(), "seed": config.seed}
        bases[size] = stages.run(f"pretrain_{size}", inputs,
                                 lambda d, s=size: pretrain_stage(config, s, world_dir, tokenizer, mesh, d))

    docs, probes, cloze = knowledge_documents(config, world_dir)
    docs_data = lm_data.one_per_row(tokenizer, docs, config.cpt.seq_len)
    arms = list(config.clues.arms)
    for arm in arms:
        if arm not in ARMS:
            raise UserInputError(f"clues.arms contains {arm!r}; valid arms: {ARMS}")
    scores = {"path": None, "_fingerprint": None}
    if any(a in ("attention", "contrast") for a in arms):
        inputs = {"small": bases["small"]["_fingerprint"], "large": bases["large"]["_fingerprint"],
                  "docs": _docs_fingerprint(docs_data), "clues": config.clues.to_dict()}
        teachers = {s: bases[s]["model_dir"] for s in ("small", "large")}
        scores = stages.run("scores", inputs, lambda d: scores_stage(config, docs_data, teachers, mesh, d))

    shots = shot_pool(world_dir) if config.data.source == "bios" else {}
    summary = {"models": {}, "stages": {}}

    def evaluate(name, model_stage):
        inputs = {"model": model_stage["_fingerprint"], "eval": config.eval.to_dict(),
                  "probes": _docs_fingerprint(probes), "seed": config.seed}
        res = stages.run(f"eval_{name}", inputs,
                         lambda d: eval_stage(config, model_stage["model_dir"], tokenizer, probes, cloze, shots, mesh, d))
        summary["models"][name] = {k: v for k, v in res.items() if not k.startswith("_")}

    evaluate("base_small", bases["small"])
    for seed in config.seeds:
        for arm in arms:
            inputs = {"base": bases["small"]["_fingerprint"], "scores": scores["_fingerprint"], "arm": arm,
                      "seed": seed, "train": config.cpt.to_dict(), "clues": config.clues.to_dict(),
                      "docs": _docs_fingerprint(docs_data)}
            stage = stages.run(f"cpt_{arm}_s{seed}", inputs,
                               lambda d, a=arm, s=seed: cpt_stage(config, a, s, docs_data, scores["path"],
                                                                  bases["small"]["model_dir"], tokenizer, mesh, d))
            summary["stages"][f"cpt_{arm}_s{seed}"] = _public(stage)
            evaluate(f"{arm}_s{seed}", stage)

    summary["stages"].update({f"pretrain_{s}": _public(bases[s]) for s in bases})
    summary["distance_from_name"] = name_distances(tokenizer, world_dir) if config.data.source == "bios" else {}
    summary["stages_reused"] = stages.reused
    summary["stages_ran"] = stages.ran
    common.write_json(os.path.join(workdir, "summary.json"), summary)
    if jax.process_index() == 0:
        print(render_table(summary, arms, list(config.seeds)))
    return summary


def _path_fingerprint(path: str) -> str:
    """Names a user checkpoint by its files' sizes and times, so replacing it reruns what depends on it."""
    from clue_jax.pipelines.stages import fingerprint

    if not os.path.isdir(path):
        raise UserInputError(f"base model directory not found: {path}")
    return fingerprint(sorted((f, os.path.getsize(os.path.join(path, f)), int(os.path.getmtime(os.path.join(path, f))))
                              for f in os.listdir(path)))


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_") and k != "model_dir"}


def _docs_fingerprint(value) -> str:
    """Content hash of token arrays or probe lists, so edited data reruns what reads it."""
    import hashlib

    digest = hashlib.sha256()
    if isinstance(value, dict):
        for key in sorted(value):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(value[key]).tobytes())
    else:
        for item in value:
            digest.update(repr(item).encode())
    return digest.hexdigest()[:16]


def name_distances(tokenizer, world_dir) -> dict[str, float]:
    rows = []
    for person in load_people(world_dir, "new"):
        text = bios.paper_bio(person)
        rows.append((text, len(person.name), bios.attribute_spans(text, person)))
    return qa_eval.token_distances(tokenizer, rows)


def render_table(summary: dict, arms: list[str], seeds: list[int]) -> str:
    """EM per attribute (ordered by distance from the name) for each model, mean over seeds."""
    dist = summary.get("distance_from_name") or {}
    any_model = next(iter(summary["models"].values()))
    attrs = [a for a in any_model["qa"] if a != "all"]
    attrs.sort(key=lambda a: dist.get(a, 0.0))
    header = ["model"] + [f"{a} ({dist[a]:.0f} tok)" if a in dist else a for a in attrs] + ["all"]
    rows = []
    names = ["base_small"] + arms
    for name in names:
        keys = [name] if name == "base_small" else [f"{name}_s{s}" for s in seeds]
        tables = [summary["models"][k]["qa"] for k in keys if k in summary["models"]]
        if not tables:
            continue
        cells = []
        for a in attrs + ["all"]:
            vals = [t[a]["exact_match"] for t in tables]
            cells.append(f"{np.mean(vals):.2f}" + (f" ± {np.std(vals):.2f}" if len(vals) > 1 else ""))
        rows.append([name] + cells)
    return "QA exact match on the new people (k-shot):\n" + common.format_table(rows, header)
