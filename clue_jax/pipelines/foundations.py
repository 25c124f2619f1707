"""The stages every pipeline starts from: the biography world, the tokenizer, and base-model pre-training.

The knowledge, replication and extraction pipelines build the same world and tokenizer stages from the same
config keys, so one workdir's stages are what each of them would have written; MCL trains its tokenizer on its
own corpus through the same stage body. Files go through workdir_fs, so a workdir may be a bucket URL.
"""
from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np

from clue_jax import workdir_fs
from clue_jax.data import bios, lm_data
from clue_jax.data.batching import ArrayBatchSource
from clue_jax.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from clue_jax.errors import UserInputError
from clue_jax.models import factory, precision
from clue_jax.models.config import ModelConfig
from clue_jax.pipelines import common
from clue_jax.pipelines.stages import fingerprint


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


# The world's keys added after its first workdirs were written, at the values that write those worlds: left
# out of the world stage's inputs there, so such a workdir keeps its world and everything built on it.
_WORLD_KEYS_AT_DEFAULT = {"style": "repeated_name", "fillers_before_far": 0}


def world_inputs(config) -> dict:
    """The world stage's inputs: config.world without the later keys at their defaults."""
    return {k: v for k, v in config.world.to_dict().items() if _WORLD_KEYS_AT_DEFAULT.get(k, object()) != v}


def load_people(world_dir, split):
    return [bios.person_from_record(r) for r in read_jsonl(os.path.join(world_dir, f"{split}.jsonl"))]


def pretraining_texts(people, bios_per_person: int, seed: int, with_qa: bool) -> list[str]:
    """Mixed training (Allen-Zhu & Li): several rich bios per person (in the world's style) plus their QA pairs."""
    texts = []
    for i, person in enumerate(people):
        rng = np.random.default_rng([seed, i])
        texts.extend(bios.pretraining_bio(person, rng) for _ in range(bios_per_person))
        if with_qa:
            texts.extend(f"{item.question}{item.target}" for item in bios.qa_items(person))
    order = np.random.default_rng(seed).permutation(len(texts))
    return [texts[i] for i in order]


def tokenizer_stage(config, world_dir, stage_dir):
    """Process 0 writes the tokenizer (the Stages barrier then lets the others read it)."""
    if jax.process_index() != 0:
        return {"path": stage_dir}
    path = config.tokenizer.path or config.base_models.small
    if not path:  # the built-in world only, also under a user corpus: see TOKENIZER_DATA
        texts = pretraining_texts(load_people(world_dir, "background"), 2, config.seed, True)
        fillers = config.world.get("fillers_before_far", 0)
        texts += [bios.study_bio(p, fillers) for p in load_people(world_dir, "new")]
        return bpe_tokenizer_stage(texts, config.tokenizer.vocab_size, stage_dir)
    with workdir_fs.local_dir_for(stage_dir) as local:  # save_pretrained writes local files; uploaded when remote
        tok = load_tokenizer(workdir_fs.local_dir(path))  # a URL (gs://...) is read through the local cache
        tok.save_pretrained(local)
    return {"path": stage_dir, "vocab_size": len(tok)}


def bpe_tokenizer_stage(texts: list[str], vocab_size: int, stage_dir: str) -> dict:
    """A BPE tokenizer trained on `texts`, written to `stage_dir` (a local folder or a URL) by process 0."""
    if jax.process_index() != 0:
        return {"path": stage_dir}
    with workdir_fs.local_dir_for(stage_dir) as local:  # the tokenizer library writes local files only
        tok = train_bpe_tokenizer(texts, vocab_size, local)
    return {"path": stage_dir, "vocab_size": len(tok)}


# What a trained tokenizer learns from: the built-in world's text, whatever data.source is. The base models
# pre-train on that world, so tokens merged only from a user's corpus would have embeddings no base model ever
# trained; and a new corpus then leaves the tokenizer and both base models' fingerprints unchanged (reused).
# (The value is the one bios runs always had, so their workdirs keep their stages.)
TOKENIZER_DATA = ["bios", ""]


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


def pretrain_stage(config, size: str, texts: list[str], tokenizer, mesh, stage_dir: str) -> dict:
    """A base model of models.<size> trained from scratch on `texts` (packed), saved in stage_dir/model."""
    train_cfg = pretrain_config(config, size)
    cfg = precision.model_config(model_config(config, size, tokenizer), train_cfg.get("precision", "checkpoint"))
    data = lm_data.pack_documents(tokenizer, texts, config.pretrain.seq_len)
    model = factory.create(cfg, config.seed, mesh)
    source = ArrayBatchSource(data, train_cfg.batch_size, seed=train_cfg.seed)
    result = common.train_model(stage_dir, model, cfg, source, train_cfg, mesh, stage=os.path.basename(stage_dir))
    result["tokens_per_epoch"] = int(data["attention_mask"].sum())
    return result


def pretrain_config(config, size: str):
    """config.pretrain, with the base model's own steps from pretrain_steps (the teacher pair's gap) if given."""
    train_cfg = config.pretrain.copy_and_resolve_references()
    steps = config.get("pretrain_steps", {}).get(size)
    if steps:
        train_cfg.steps = int(steps)
    return train_cfg


def array_fingerprint(arrays: dict) -> str:
    """Content hash of token arrays, so edited data reruns what reads it."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()[:16]


def path_fingerprint(path: str) -> str:
    """Names a user checkpoint by its files' sizes and times, so replacing it reruns what depends on it."""
    if workdir_fs.is_remote(path):
        return fingerprint(workdir_fs.file_versions(path))
    if not os.path.isdir(path):
        raise UserInputError(f"base model directory not found: {path}")
    return fingerprint(sorted((f, os.path.getsize(os.path.join(path, f)), int(os.path.getmtime(os.path.join(path, f))))
                              for f in os.listdir(path)))


def public(result: dict) -> dict:
    """A stage result without its bookkeeping (fingerprint, model directory): what summaries show."""
    return {k: v for k, v in result.items() if not k.startswith("_") and k != "model_dir"}
