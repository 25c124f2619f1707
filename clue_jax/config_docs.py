"""What every key of every shipped config means, and docs/configs.md written from it.

One table of meanings (below) and the configs themselves are the only sources: the page lists each
config's keys with their values as `get_config(variant)` returns them, so it cannot drift from the
configs, and a key without a meaning here fails the tests.

    python -m clue_jax.config_docs > docs/configs.md
"""
from __future__ import annotations

import os
import sys
from unittest import mock

from clue_jax import configs
from clue_jax.trackers import flatten

# The training sections share one set of keys (clue_jax/train/defaults.py: train_config).
TRAIN_SECTIONS = {
    "pretrain": "pre-training of the base models or, for MCL, of the ELECTRA pairs",
    "cpt": "the student's continual pre-training, per arm and seed",
    "ft": "QA fine-tuning, per fine-tuning seed",
    "finetune": "fine-tuning each pre-trained discriminator on a downstream task",
}
TRAIN_KEYS = {
    "steps": "optimizer steps",
    "batch_size": "global batch in rows, split over the mesh's `data` x `fsdp` axes",
    "micro_batches": "gradient accumulation: the batch is split into this many micro-batches",
    "seq_len": "tokens per row",
    "lr": "peak learning rate (AdamW)",
    "warmup_steps": "linear warm-up steps",
    "schedule": "learning-rate decay after warm-up: `cosine`, `linear` or `constant`",
    "weight_decay": "AdamW weight decay",
    "clip_norm": "global gradient-norm clipping",
    "b1": "AdamW beta1",
    "b2": "AdamW beta2",
    "seed": "seed of this stage's initialisation and data order",
    "log_every": "steps between logged metrics (metrics.jsonl, TensorBoard, the NaN check)",
    "eval_every": "steps between evaluations during training, where the stage has them, for learning curves",
    "checkpoint_every": "steps between orbax checkpoints",
    "keep_checkpoints": "checkpoints kept (the newest ones)",
    "remat": "recompute activations in the backward pass: `none`, `full` or `dots` (per scanned layer)",
    "precision": "`checkpoint` (weights, moments and compute in the model's dtype) or `mixed` (float32 master "
                 "weights and moments, bf16 compute)",
}
# The causal LMs (clue_jax/models/config.py), under models.small and models.large.
MODEL_ROLES = {"small": "the small base model (teacher and student)", "large": "the large teacher"}
MODEL_KEYS = {
    "flavour": "architecture: `gpt2`, `llama` (LLaMA-3) or `gemma2`",
    "vocab_size": "vocabulary size (built-in world: set from the tokenizer)",
    "d_model": "hidden width",
    "num_layers": "transformer blocks",
    "num_heads": "attention heads",
    "num_kv_heads": "key/value heads (grouped-query attention)",
    "head_dim": "width of one head (default d_model / num_heads)",
    "mlp_dim": "MLP hidden width",
    "max_len": "longest sequence (positions); must cover the stage's seq_len",
    "tie_embeddings": "output head shares the input embedding",
    "rope_theta": "RoPE base frequency",
    "norm_eps": "epsilon of the layer norms",
    "use_bias": "biases in the projections (GPT-2)",
    "sliding_window": "Gemma-2: even layers attend this far back; 0 = off",
    "attn_logit_softcap": "Gemma-2: tanh soft cap of the attention logits; 0 = off",
    "final_logit_softcap": "Gemma-2: tanh soft cap of the output logits; 0 = off",
    "query_pre_attn_scalar": "Gemma-2: queries scaled by this**-0.5; 0 = head_dim",
    "dtype": "compute dtype",
    "param_dtype": "parameter dtype",
    "remat": "recompute activations in the backward pass (the trainer sets it from the stage's `remat`)",
    "scan_unroll": "scanned layers unrolled per loop iteration (1 compiles one layer; >= num_layers unrolls)",
}
_ARMS = "`plain`, `random`, `attention`, `contrast`, `rate_matched`, `shuffled`"
DESCRIPTIONS = {
    "pipeline": "which pipeline runs: `knowledge`, `replicate`, `extraction` or `mcl`",
    "seed": "seed of the data: world split, tokenizer, corpus order, prompts",
    "seeds": "model seeds: each arm is trained once per seed",
    "smoke_test": "set by `:tiny`: the run says under its tables that its numbers mean nothing",
    "world.seed": "seed of the built-in biography world",
    "world.num_background": "background people: the base models' pre-training people",
    "world.num_new": "new people: what the student learns and is asked about",
    "world.zipf_exponent": "skew of attribute values (0 = uniform; > 0 = Zipf, some values far more frequent)",
    "world.num_cities": "distinct birth cities in the world",
    "world.num_universities": "distinct universities in the world",
    "world.num_companies": "distinct companies in the world",
    "world.num_majors": "distinct majors in the world",
    "world.style": "`repeated_name` (pre-training bios repeat the full name in about half their sentences) or "
                   "`pronoun` (the name in a bio's first sentence only, then he/she/they; sentences permuted, "
                   "0-4 filler sentences mixed in)",
    "world.fillers_before_far": "`pronoun` world: filler sentences before university, major and company in the "
                                "new people's biographies (their distance from the name)",
    "data.source": "`bios` (the built-in world's new people) or `corpus` (your `data.corpus`)",
    "data.corpus": "your documents: `.jsonl` with one `{\"text\": ...}` a line, or `.txt` separated by blank lines",
    "data.qa_file": "your questions: `.jsonl` with `question`, `answer` (optional `attribute`, `name`)",
    "data.num_dev": "new people held out as dev people (for choices made on dev)",
    "data.bios_per_person": "paraphrased biographies per background person in pre-training",
    "data.pretrain_qa": "pre-training also sees the background people's QA pairs (teaches the question format)",
    "data.cpt_replay_rows": "rows of background text in every continual-pre-training batch (0 = new text only)",
    "tokenizer.path": "a tokenizer directory; empty = the small checkpoint's, else a BPE trained on the world",
    "tokenizer.vocab_size": "entries of the BPE trained here",
    "base_models.small": "an HF (or clue_jax) checkpoint directory or URL for the small model; empty = pre-train it",
    "base_models.large": "the same for the large teacher",
    "lora.rank": "LoRA rank of the student's adapters; 0 = full fine-tuning",
    "lora.alpha": "LoRA scale numerator (the update is alpha / rank * A @ B)",
    "lora.targets": "projections that get adapters",
    "clues.arms": f"arms trained and compared: {_ARMS}",
    "clues.alpha": "alpha of p(r) = alpha * (1 - exp(-beta * r)) for arms without a `clues.chosen` entry",
    "clues.beta": "beta of p(r) for arms without a `clues.chosen` entry",
    "clues.chosen.attention.alpha": "alpha of the `attention` arm (the replication's choice on dev)",
    "clues.chosen.attention.beta": "beta of the `attention` arm",
    "clues.chosen.contrast.alpha": "alpha of the `contrast` arm (the replication's choice on dev)",
    "clues.chosen.contrast.beta": "beta of the `contrast` arm",
    "clues.original_fraction": "share of rows left intact (no dropout) when dropout is drawn fresh",
    "clues.mode": "`cached` (teachers score once), `live` (inside every step) or `fixed_copies` (offline "
                  "copies + originals, as the clue-dropout paper trained)",
    "clues.copies": "augmented copies per document under `fixed_copies` (the clue-dropout paper: 10)",
    "clues.protected_extra": "extra tokens never dropped (besides BOS, padding, \",\" and \".\")",
    "clues.teacher_dtype": "dtype the teachers score in (`float32` or `bfloat16`)",
    "clues.query_block": "query rows per block of the blocked scoring attention",
    "clues.score_batch": "documents per scoring batch",
    "clues.render_examples": "clue views written to `clues/example_<i>.html|png`",
    "logging.trackers": "where the scalars go besides `metrics.jsonl`: `tensorboard`, `wandb` (the `[wandb]` "
                        "extra), or `()` for none",
    "logging.wandb_project": "the Weights & Biases project when `wandb` is a tracker",
    "eval.k_shot": "solved examples before each question",
    "eval.max_new_tokens": "greedy decoding length of an answer",
    "eval.batch_size": "questions per decoding batch",
    "eval.cloze": "also run the cloze probe ('{name} had a professional role at')",
    "eval.primary": "the probe reports and dev choices rank by: `cloze` or `qa`",
    "eval.ranking": "also answer by ranking the candidate set (not only by decoding)",
    "eval.score_batch": "candidates per scoring batch when ranking",
    "mesh.shape": "(data, fsdp, tensor) device mesh; one entry may be -1 (fills)",
    "mesh.dcn_shape": "slices/nodes each mesh axis spans over the data-center network; () = data first",
    "pretrain_steps.small": "pre-training steps of the small teacher",
    "pretrain_steps.large": "pre-training steps of the large teacher (longer: a real capability gap)",
    "protocol.names": "budgets run: `paper`, `equal_compute`, `long`",
    "protocol.epochs": "epochs over 1 original + `clues.copies` copies under the clue-dropout paper's protocol",
    "protocol.warmup_fraction": "warm-up as a share of each run's steps",
    "protocol.curve_points": "times cloze EM is measured during each run (EM against steps)",
    "students": "students trained: `small`, and optionally `large`",
    "grid.enabled": "choose alpha and beta on the dev people (needs the built-in world)",
    "grid.alphas": "alphas of the grid",
    "grid.betas": "betas of the grid",
    "grid.seed": "seed of the grid's runs",
    "grid.protocol": "budget the grid trains under",
    "gate.probe": "probe asked of both teachers for the gate: `qa` or `cloze`",
    "gate.people": "background people the gate asks about",
    "gate.min_gap": "mean exact-match lead the large teacher needs",
    "bootstrap.n_boot": "bootstrap resamples of the paired comparisons",
    "splits.pretrain_qa": "people whose QA pairs are in pre-training",
    "splits.finetune": "people whose QA pairs are fine-tuned on",
    "splits.dev": "dev people (chooses lambda and the vanilla length)",
    "splits.test": "test people",
    "relations": "relations asked about",
    "skew.strata": "pre-training-frequency strata each relation's objects are split into",
    "skew.left_out": "share of each stratum's objects left out of fine-tuning",
    "skew.oversampled": "share of each stratum's objects repeated in fine-tuning",
    "skew.repeat": "repeats of an over-sampled object",
    "sweep.steps": "vanilla fine-tuning lengths (exact match against steps)",
    "mixture.ratio": "pre-training replay batches per fine-tuning batch",
    "mixture.match_ft_batches": "the mixture arm trains `ft.steps` QA batches (more steps in all)",
    "mixing.modes": "model mixing: `interpolate` (probabilities) and/or `log_linear`",
    "mixing.grid": "lambdas tried when decoding (weight on the fine-tuned model)",
    "mixing.rank_grid": "lambdas tried when ranking candidates",
    "shock.smoothing": "added to every count before the logs of the shock statistic",
    "shock.null_draws": "simulated predictors of the calibrated null per arm (0 = none)",
    "corpus.style": "biography style: `paper`, `single_template` or `rich`",
    "corpus.bios_per_person": "biographies per person in the pre-training corpus",
    "corpus.seq_len": "tokens per pre-training row",
    "corpus.num_probe": "rows the label-share probe reads",
    "corpus.segments": "1: one segment; 2: `[CLS] A [SEP] B [SEP]`, B of token type 1",
    "model.hidden_size": "the discriminator's width",
    "model.embedding_size": "embedding width (shared by generator and discriminator)",
    "model.num_layers": "encoder layers",
    "model.num_heads": "attention heads",
    "model.intermediate_size": "MLP hidden width",
    "model.max_len": "longest sequence",
    "model.dropout": "dropout rate in the encoders",
    "generator.width_fraction": "the generator's width as a share of the discriminator's",
    "objective.sampling": "`step` (one course per step) or `all` (every course every step)",
    "objective.course_weights": "sampling probabilities per course under `step`; () = uniform",
    "objective.mask_rate": "share of tokens masked for RTD",
    "objective.swap_rate": "share of tokens swapped for STD",
    "objective.insert_rate": "share of insertions for ITD",
    "objective.gen_weight": "weight of the generator's loss",
    "objective.disc_weight": "weight of the discriminator's loss",
    "objective.regen_weight": "weight of the re-generation losses (correction notebook)",
    "objective.redisc_weight": "weight of the re-discrimination losses",
    "objective.temperature": "sampling temperature of the generator",
    "objective.dropout": "pass dropout keys to the models (active when `model.dropout` > 0)",
    "arms": "arms pre-trained: `electra`, `std`, `itd`, `all3`, `mcl`",
    "probe_every": "steps between label-share probes",
    "curve.arms": "arms also fine-tuned at intermediate checkpoints",
    "curve.fractions": "those checkpoints, as shares of pre-training",
    "soups.enabled": "train soup ingredients and average them",
    "soups.warmup_arm": "arm whose checkpoint the ingredients branch from",
    "soups.warmup_fraction": "share of pre-training before the branch",
    "soups.kinds": "soups made: `uniform`, `greedy`, `weighted`",
    "soups.weighting": "weighted soup: `softmax` (of dev score / tau) or `min_subtracted`",
    "soups.tau": "temperature of the softmax weighting",
    "soups.ingredients.re_rtd": "correction losses of the `re_rtd` ingredient",
    "soups.ingredients.re_std": "correction losses of the `re_std` ingredient",
    "soups.ingredients.re_all": "correction losses of the `re_all` ingredient",
    "downstream.train_people": "people of the downstream training set",
    "downstream.dev_people": "people of the downstream dev set",
    "downstream.test_people": "people of the downstream test set",
    "downstream.qa_per_person": "QA examples per person",
    "downstream.pair_per_person": "pair-task examples per person",
    "downstream.unanswerable_rate": "share of unanswerable questions",
    "downstream.drop_max": "up to this many other attributes left out of each context",
    "downstream.max_len": "tokens per downstream row",
    "downstream.max_answer_tokens": "longest answer span",
    "downstream.eval_batch": "rows per evaluation batch",
    "downstream.tasks": "built-in tasks: `bios_qa`, `bios_pair`",
    "real_tasks.glue": "GLUE tasks to run when their tfds data is prepared",
    "real_tasks.squad": "run SQuAD 2.0 when its tfds data is prepared",
    "real_tasks.data_dir": "tfds data directory",
    "real_tasks.limit_train": "training examples per task",
    "real_tasks.dev_size": "training examples held out as dev",
    "real_tasks.limit_eval": "evaluation examples per task",
    "real_tasks.doc_stride": "SQuAD: a context window starts every doc_stride tokens",
    "random_init": "also fine-tune a randomly initialised pair (the no-pre-training floor)",
    "intrinsic.enabled": "measure each discriminator's detection AUC on one fixed corrupted held-out set",
    "intrinsic.reference_arm": "arm whose generator corrupts that set",
    "intrinsic.num_rows": "held-out rows",
    "intrinsic.seed": "seed of the corruption",
    "compile_cache_dir": "persistent XLA compile cache; empty = WORKDIR/jax_cache, `off` = none",
}


def describe(key: str) -> str | None:
    """The meaning of a dotted config key, or None when no table has it."""
    if key in DESCRIPTIONS:
        return DESCRIPTIONS[key]
    section, _, rest = key.partition(".")
    if section in TRAIN_SECTIONS and rest in TRAIN_KEYS:
        return f"{TRAIN_KEYS[rest]} ({TRAIN_SECTIONS[section]})"
    role, _, name = rest.partition(".")
    if section == "models" and role in MODEL_ROLES and name in MODEL_KEYS:
        return f"{MODEL_KEYS[name]} ({MODEL_ROLES[role]})"
    return None


def shipped_keys() -> dict[str, dict[str, dict]]:
    """{config: {variant: {key: value}}} of every shipped config, independent of the environment."""
    with mock.patch.dict(os.environ, {"CLUE_JAX_TINY_CKPTS": ""}):  # the tiny pod variants read it
        return {name: {v: flatten(configs.get_config(name, v).to_dict()) for v in configs.info(name).variants}
                for name in configs.names()}


def _value(v) -> str:
    text = f"{v:.6g}" if isinstance(v, float) and len(repr(v)) > 8 else repr(v)
    return f"`{text}`".replace("|", "\\|")


def render() -> str:
    """docs/configs.md."""
    lines = ["# Config keys", "",
             "<!-- Generated by `python -m clue_jax.config_docs > docs/configs.md` from the shipped configs and "
             "the meanings in clue_jax/config_docs.py; do not edit by hand. -->", "",
             "Every key of every shipped config, with its value in each variant (a variant column shows only "
             "the values that differ from the default). Override any of them with `--config.KEY=VALUE`; how the "
             "command line works: [cli.md](cli.md).", ""]
    for name, variants in shipped_keys().items():
        info = configs.info(name)
        extra = [v for v in variants if v]
        lines += [f"## {name}", "", f"`configs/{name}.py`, pipeline `{info.pipeline}`: {info.summary}", "",
                  "| key | default | " + "".join(f":{v} | " for v in extra) + "meaning |",
                  "|---|---|" + "---|" * len(extra) + "---|"]
        default = variants[""]
        for key in sorted(set().union(*variants.values())):
            cells = [_value(default[key]) if key in default else "(none)"]
            for v in extra:
                value = variants[v].get(key)
                cells.append("" if value == default.get(key) else _value(value))
            lines.append(f"| `{key}` | " + " | ".join(cells) + f" | {describe(key) or ''} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
