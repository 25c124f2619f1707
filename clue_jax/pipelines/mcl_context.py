"""What every MCL stage reads: the tokenizer, the encoder configs, the pre-training corpus and the
downstream tasks, built once per run (the tokenizer a cached stage)."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from clue_jax.data import glue_squad
from clue_jax.data.tokenizer import load_tokenizer
from clue_jax.errors import UserInputError
from clue_jax.mcl import bios_tasks, downstream, objective as mcl_objective
from clue_jax.mcl.corpus import encode_corpus, pretraining_texts, world_people
from clue_jax.models.encoder import EncoderConfig, generator_config
from clue_jax.pipelines import common
from clue_jax.pipelines.foundations import array_fingerprint, bpe_tokenizer_stage
from clue_jax.pipelines.stages import Stages, fingerprint

log = logging.getLogger("clue_jax")

LOAD_SAMPLES: list[float] = []  # 1-minute load averages sampled during the run (the machine may be shared)


def model_configs(config, vocab_size: int) -> tuple[EncoderConfig, EncoderConfig]:
    values = dict(config.model.to_dict(), vocab_size=vocab_size)
    disc = EncoderConfig.from_dict(values, where="model")
    return disc, generator_config(disc, float(config.generator.width_fraction))


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


def prepare(config, workdir: str, planned: int | None = None) -> Context:
    """planned: the stages the whole run visits (Stages.expect)."""
    mesh = common.make_mesh(config)
    stages = Stages(workdir)
    if planned is not None:
        stages.expect(planned)
    people = world_people(config)
    c = config.corpus
    style = bios_tasks.bio_style(c.style.to_dict() if hasattr(c.style, "to_dict") else c.style)
    texts = pretraining_texts(people["background"], c.bios_per_person, config.seed, style)
    tok_inputs = {"world": config.world.to_dict(), "corpus": c.to_dict(), "tokenizer": config.tokenizer.to_dict(),
                  "seed": config.seed}
    tok_res = stages.run("tokenizer", tok_inputs, lambda d: bpe_tokenizer_stage(texts, config.tokenizer.vocab_size, d))
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
    task_cfg = bios_tasks.BiosTaskConfig(qa_per_person=d.qa_per_person, pair_per_person=d.pair_per_person,
                                         unanswerable_rate=d.unanswerable_rate, drop_max=d.drop_max,
                                         style=style, seed=config.seed)
    examples = bios_tasks.builtin_tasks({s: people[s] for s in ("train", "dev", "test")}, task_cfg)
    wanted = tuple(d.get("tasks", tuple(examples)))
    for name in wanted:
        if name not in examples:
            raise UserInputError(f"downstream.tasks contains {name!r}; valid: {sorted(examples)}")
    tasks = [downstream.make_task(name, examples[name], tokenizer, d.max_len, on_overflow="error")
             for name in wanted]
    notes: list[str] = []
    tasks += _real_tasks(config, tokenizer, d.max_len, notes)
    tasks_fp = fingerprint([(t.name, {s: array_fingerprint(a) for s, a in t.arrays.items()}) for t in tasks])
    heldout = None
    if config.get("intrinsic", {}).get("enabled", False):
        texts_h = pretraining_texts(people["test"], 1, config.seed + 7, style)[:int(config.intrinsic.num_rows)]
        heldout = encode_corpus(tokenizer, texts_h, c.seq_len, int(c.get("segments", 1)))
    return Context(config, workdir, mesh, stages, tokenizer, disc_cfg, gen_cfg, corpus, array_fingerprint(corpus),
                   probe, tasks, tasks_fp, notes, heldout)
