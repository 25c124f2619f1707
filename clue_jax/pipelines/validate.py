"""Config values checked before anything trains: types, ranges, choices, and keys that must agree.

ml_collections checks that an override parses as the default's type; it does
not know that a batch size must be positive, a probability in [0, 1] or an arm
one of four names. `check_config` does, for every config this project ships,
and raises one `UserInputError` line naming the key, the value and what is
allowed -- before the first stage runs, so a bad value costs no pre-training.
"""
from __future__ import annotations

import fnmatch
import logging
import math
from typing import Any, Callable, Iterable

import ml_collections

from clue_jax import trackers
from clue_jax.choices import ARMS, DTYPES, FLAVOURS, PRECISIONS, SCHEDULES, WORLD_STYLES
from clue_jax.config_check import flat_items
from clue_jax.data.bios_vocab import FILLERS
from clue_jax.errors import UserInputError
from clue_jax.pipelines import PIPELINES
from clue_jax.pipelines.protocol import PROTOCOLS

log = logging.getLogger("clue_jax")

MODES = ("cached", "live", "fixed_copies")
SOURCES = ("bios", "corpus")
TRAIN_SECTIONS = ("pretrain", "cpt", "ft", "finetune")
CORPUS_PIPELINES = ("knowledge", "replicate")  # the pipelines that read data.corpus / data.qa_file

Check = Callable[[Any], str | None]  # value -> what is allowed, or None when the value is fine


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


INT_MAX = 2**31 - 1  # step counters, seeds and sizes become int32 inside JAX and optax


def integer(minimum: int) -> Check:
    what = {0: "an integer >= 0", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")

    def check(v):
        if not (_is_int(v) and v >= minimum):
            return f"must be {what}"
        return None if v <= INT_MAX else f"must be at most {INT_MAX} (JAX counts in int32)"
    return check


def number(minimum: float = 0.0, maximum: float | None = None, strict: bool = False) -> Check:
    if maximum is not None:
        what = f"a number in [{minimum:g}, {maximum:g}]"
    else:
        what = f"a number > {minimum:g}" if strict else f"a number >= {minimum:g}"

    def check(v):
        ok = _is_number(v) and (v > minimum if strict else v >= minimum) and (maximum is None or v <= maximum)
        if _is_number(v) and not math.isfinite(v):
            return f"must be finite ({what})"
        return None if ok else f"must be {what}"
    return check


def one_of(choices: tuple) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(map(str, choices))}"


def tuple_of(item: Check, *, non_empty: bool = True) -> Check:
    """A tuple whose items each pass `item` (distinct items: `repeat_problem`, for every tuple)."""
    def check(v):
        if not isinstance(v, (tuple, list)):
            return "must be a tuple"
        if non_empty and not v:
            return "must not be empty"
        for x in v:
            problem = item(x)
            if problem:
                return f"item {x!r} {problem}"
        return None
    return check


PROB = number(0.0, 1.0)
POS = integer(1)
NONNEG = integer(0)
POS_NUM = number(0.0, strict=True)
NONNEG_NUM = number(0.0)
BETA: Check = lambda v: None if _is_number(v) and 0 <= v < 1 else "must be a number in [0, 1)"  # Adam's decays
FRACTION_GAP = number(-1.0, 1.0)

TRAIN_RULES: dict[str, Check] = {
    "steps": POS, "batch_size": POS, "micro_batches": POS, "seq_len": POS, "lr": POS_NUM, "warmup_steps": NONNEG,
    "schedule": one_of(SCHEDULES), "weight_decay": NONNEG_NUM, "clip_norm": NONNEG_NUM, "b1": BETA, "b2": BETA, "seed": NONNEG, "log_every": POS, "eval_every": POS, "checkpoint_every": POS,
    "keep_checkpoints": POS, "precision": one_of(PRECISIONS),
}

# Glob pattern over the dotted key -> check; a key matches the first pattern that fits it.
RULES: dict[str, Check] = {
    **{f"{section}.{key}": check for section in TRAIN_SECTIONS for key, check in TRAIN_RULES.items()},
    "seed": NONNEG, "seeds": tuple_of(NONNEG), "*.seed": NONNEG, "logging.trackers": trackers.problem,
    "world.zipf_exponent": NONNEG_NUM, "world.num_new": NONNEG, "world.num_background": POS, "world.num_*": POS,
    "world.style": one_of(WORLD_STYLES), "world.fillers_before_far": lambda v: integer(0)(v) or (
        None if v <= len(FILLERS) else f"must be at most {len(FILLERS)} (the filler sentences there are)"),
    "data.source": one_of(SOURCES), "data.num_dev": NONNEG, "data.bios_per_person": POS,
    "data.cpt_replay_rows": NONNEG,
    "tokenizer.vocab_size": integer(260),  # 256 bytes + 4 special tokens (data/tokenizer.py)
    "models.*.flavour": one_of(FLAVOURS), "models.*.num_kv_heads": NONNEG, "models.*.head_dim": NONNEG,
    "models.*.rope_theta": POS_NUM, "models.*.norm_eps": POS_NUM, "models.*.sliding_window": NONNEG,
    "models.*.dtype": one_of(DTYPES), "models.*.param_dtype": one_of(DTYPES), "models.*.*_softcap": NONNEG_NUM,
    "models.*.query_pre_attn_scalar": NONNEG_NUM, "pipeline": one_of(tuple(sorted(PIPELINES))),
    "models.*.scan_unroll": POS, "pretrain_steps.*": POS,
    **{f"models.*.{k}": POS for k in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_dim", "max_len")},
    "lora.rank": NONNEG, "lora.alpha": POS_NUM,
    "clues.arms": tuple_of(one_of(ARMS)), "clues.alpha": PROB, "clues.beta": PROB, "clues.original_fraction": PROB,
    "clues.chosen.*.alpha": PROB, "clues.chosen.*.beta": PROB,
    "clues.mode": one_of(MODES), "clues.copies": POS, "clues.teacher_dtype": one_of(DTYPES),
    "clues.query_block": POS, "clues.score_batch": POS, "clues.render_examples": NONNEG,
    "eval.k_shot": NONNEG, "eval.max_new_tokens": POS, "eval.batch_size": POS, "eval.score_batch": POS,
    "eval.primary": one_of(("cloze", "qa")),
    "grid.alphas": tuple_of(PROB), "grid.betas": tuple_of(PROB), "students": tuple_of(one_of(("small", "large"))),
    "protocol.names": tuple_of(one_of(PROTOCOLS)), "grid.protocol": one_of(PROTOCOLS),
    "protocol.epochs": POS_NUM, "protocol.warmup_fraction": PROB, "protocol.curve_points": POS,
    "gate.people": POS, "gate.min_gap": FRACTION_GAP, "bootstrap.n_boot": POS,
    # extraction
    "splits.*": NONNEG, "skew.strata": POS, "skew.left_out": PROB, "skew.oversampled": PROB,
    "skew.repeat": POS, "sweep.steps": tuple_of(POS), "shock.null_draws": NONNEG,
    "mixture.ratio": NONNEG_NUM, "mixing.modes": tuple_of(one_of(("interpolate", "log_linear"))),
    "mixing.grid": tuple_of(PROB), "mixing.rank_grid": tuple_of(PROB), "shock.smoothing": NONNEG_NUM,
    # mcl
    "corpus.bios_per_person": POS, "corpus.seq_len": POS, "corpus.num_probe": POS,
    "model.dropout": PROB, "model.*": POS, "generator.width_fraction": number(0.0, 1.0),
    "objective.*_rate": PROB, "objective.temperature": POS_NUM, "objective.*_weight": NONNEG_NUM,
    "probe_every": POS, "curve.fractions": tuple_of(PROB, non_empty=False), "soups.warmup_fraction": PROB,
    "downstream.unanswerable_rate": PROB, "downstream.drop_max": NONNEG,
    "downstream.tasks": tuple_of(one_of(("bios_qa", "bios_pair"))), "downstream.*": POS,
    "corpus.segments": one_of((1, 2)), "soups.tau": POS_NUM, "soups.weighting": one_of(("softmax", "min_subtracted")),
    "objective.sampling": one_of(("step", "example", "all")), "intrinsic.num_rows": POS, "real_tasks.doc_stride": NONNEG,
    "real_tasks.limit_*": POS, "real_tasks.dev_size": POS,
    "soups.kinds": tuple_of(one_of(("uniform", "greedy"))),
}

# Tuples whose items are positions (a mesh shape, per-course weights, rope scaling's four numbers), where a
# repeated value means something; in every other tuple (seeds, arms, protocols, courses, grids ...) a
# repeat would run the same thing twice and count it as two, so it is refused.
REPEATS_ALLOWED = ("mesh.shape", "mesh.dcn_shape", "objective.course_weights", "models.*.rope_scaling")


def rule_for(key: str) -> Check | None:
    return next((check for pattern, check in RULES.items() if fnmatch.fnmatchcase(key, pattern)), None)


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def tuple_hint(key: str, value) -> str:
    """How to write a tuple on the command line, from what the user wrote (('plain,contrast',) -> the tuple)."""
    parts = [p.strip() for x in value for p in str(x).split(",") if p.strip()]
    quoted = [p if p.lstrip("-").replace(".", "", 1).isdigit() else repr(p) for p in parts]
    return f'; a tuple is written --config.{key}="({",".join(quoted)}{"," if len(quoted) == 1 else ""})"'


def repeat_problem(key: str, value) -> str | None:
    """A value given twice in a tuple that must hold distinct values."""
    if not isinstance(value, (tuple, list)) or any(fnmatch.fnmatchcase(key, p) for p in REPEATS_ALLOWED):
        return None
    seen = []
    for x in value:
        if x in seen:
            return f"{_show(x)} is given twice; the items must be distinct (each would run and count again)"
        seen.append(x)
    return None


def number_problem(value) -> str | None:
    """Every number in a config, with or without its own rule: inf and nan are never a setting, and an
    integer must fit the int32 JAX computes with."""
    for x in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(x, float) and not math.isfinite(x):
            return f"{x} is not a finite number"
        if _is_int(x) and abs(x) > INT_MAX:
            return f"{x} is out of range: at most {INT_MAX} in size (JAX counts in int32)"
    return None


def value_errors(config: ml_collections.ConfigDict) -> list[str]:
    """One message per key whose value breaks its rule, repeats an item or is not finite."""
    errors = []
    for key, value in flat_items(config):
        check = rule_for(key)
        problem = (check(value) if check else None) or repeat_problem(key, value) or number_problem(value)
        if problem:
            comma = isinstance(value, (tuple, list)) and any("," in str(x) for x in value)
            errors.append(f"--config.{key}={_show(value)}: {problem}{tuple_hint(key, value) if comma else ''}")
    return errors


def _get(config, dotted: str, default=None):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return default
        node = node[part]
    return node


def resolve_corpus_source(config: ml_collections.ConfigDict) -> None:
    """A corpus flag means the user's corpus: data.source follows data.corpus (logged), never silently ignored."""
    if config.get("pipeline") not in CORPUS_PIPELINES or "data" not in config:
        return
    data = config.data
    if data.get("source") == "bios" and data.get("corpus"):
        log.info("data.corpus is set: data.source set to 'corpus' (the built-in biographies are not learned)")
        data.source = "corpus"


def cross_errors(config: ml_collections.ConfigDict) -> list[str]:
    """Keys that are each fine but do not fit together."""
    errors = []
    data = config.get("data")
    if config.get("pipeline") in CORPUS_PIPELINES and data is not None:
        if data.get("source") == "corpus":
            for key in ("corpus", "qa_file"):
                if not data.get(key):
                    errors.append(f"data.source='corpus' needs --config.data.{key}=FILE "
                                  f"({'documents, .jsonl or .txt' if key == 'corpus' else 'questions, .jsonl'})")
        elif data.get("qa_file"):
            errors.append("--config.data.qa_file is set without --config.data.corpus: give the documents the "
                          "questions ask about")
        replay, batch = data.get("cpt_replay_rows", 0), _get(config, "cpt.batch_size")
        if _is_int(replay) and _is_int(batch) and replay and replay >= batch:
            errors.append(f"--config.data.cpt_replay_rows={replay} leaves no room in cpt.batch_size={batch}")
        num_dev, num_new = data.get("num_dev", 0), _get(config, "world.num_new")
        if data.get("source") == "bios" and _is_int(num_dev) and _is_int(num_new) and num_dev >= num_new:
            errors.append(f"--config.data.num_dev={num_dev} leaves no test people out of world.num_new={num_new}")
    errors += world_style_errors(config)
    grid = config.get("grid")
    if config.get("pipeline") == "replicate" and grid is not None and grid.get("enabled") and data is not None and (
            data.get("source") != "bios" or not data.get("num_dev", 0)):
        # the grid chooses alpha/beta on held-out people, which only the built-in world provides
        errors.append(
            f"grid.enabled needs dev people (data.source='bios' with data.num_dev > 0; got source="
            f"{data.get('source')!r}, num_dev={data.get('num_dev', 0)}); on your own corpus set "
            "--config.grid.enabled=False and choose --config.clues.alpha / --config.clues.beta")
    for section in TRAIN_SECTIONS:
        steps, warm = _get(config, f"{section}.steps"), _get(config, f"{section}.warmup_steps")
        if _is_int(steps) and _is_int(warm) and warm > steps > 0:
            errors.append(f"--config.{section}.warmup_steps={warm} is more than {section}.steps={steps}")
    errors += position_errors(config) + precision_errors(config)
    shape = _get(config, "mesh.shape")
    if shape is not None and not (isinstance(shape, (tuple, list)) and len(shape) == 3 and all(
            _is_int(s) and (s > 0 or s == -1) for s in shape) and list(shape).count(-1) <= 1):
        errors.append(f"--config.mesh.shape={shape}: must be (data, fsdp, tensor), positive integers with at "
                      'most one -1 (fills), e.g. --config.mesh.shape="(-1,1,1)"')
    return errors


def world_style_errors(config: ml_collections.ConfigDict) -> list[str]:
    """Filler sentences exist only in the pronoun-style world's test biographies, which only a bios run learns."""
    fillers, style = _get(config, "world.fillers_before_far", 0), _get(config, "world.style", "repeated_name")
    if not (_is_int(fillers) and fillers > 0):
        return []
    if style != "pronoun":
        return [f"--config.world.fillers_before_far={fillers} needs --config.world.style=pronoun (the "
                f"{style!r} world's test biographies have no filler sentences)"]
    if _get(config, "data.source") == "corpus":
        return [f"--config.world.fillers_before_far={fillers} sets the built-in world's test biographies, "
                "but data.source='corpus' tests your documents: leave it at 0"]
    return []


def position_errors(config: ml_collections.ConfigDict) -> list[str]:
    """A model pre-trained here must accept the longest training row (GPT-2's learned positions end at max_len)
    and a prompt plus eval.max_new_tokens generated tokens.

    Base models read from checkpoints are checked against their own config when the pipeline loads them.
    """
    errors, positions = [], {}
    models = config.get("models")
    if not isinstance(models, ml_collections.ConfigDict):
        return errors
    for size, model in models.items():
        if not isinstance(model, ml_collections.ConfigDict) or _get(config, f"base_models.{size}"):
            continue
        max_len = model.get("max_len")
        if _is_int(max_len):
            positions[size] = max_len
        for section in TRAIN_SECTIONS:
            seq_len = _get(config, f"{section}.seq_len")
            if _is_int(max_len) and _is_int(seq_len) and seq_len > max_len:
                errors.append(f"models.{size} ({model.get('flavour')}) has max_len={max_len} positions, fewer "
                              f"than {section}.seq_len={seq_len}: raise --config.models.{size}.max_len or lower "
                              f"--config.{section}.seq_len")
    new_tokens = _get(config, "eval.max_new_tokens")
    if positions and _is_int(new_tokens) and new_tokens >= min(positions.values()):
        size = min(positions, key=positions.get)
        errors.append(f"--config.eval.max_new_tokens={new_tokens} leaves no room for a prompt in models.{size}'s "
                      f"max_len={positions[size]} positions: at most {positions[size] - 1}, less the prompt's tokens")
    return errors


def precision_errors(config: ml_collections.ConfigDict) -> list[str]:
    """train.precision='mixed' is for full fine-tuning of the causal LMs (models/precision.py)."""
    mixed = [s for s in TRAIN_SECTIONS if _get(config, f"{s}.precision") == "mixed"]
    if mixed and config.get("pipeline") == "mcl":
        return [f"--config.{mixed[0]}.precision='mixed' is not supported by the MCL pipeline (its encoders "
                f"train in float32); set --config.{mixed[0]}.precision=checkpoint"]
    rank = _get(config, "lora.rank", 0)
    if "cpt" in mixed and _is_int(rank) and rank > 0:
        return [f"--config.cpt.precision='mixed' is for full fine-tuning, but lora.rank={rank}: the LoRA adapters "
                "(all that trains) are float32 already and the frozen base stays in its checkpoint dtype; set "
                "--config.cpt.precision=checkpoint or --config.lora.rank=0"]
    return []


DROP_KEYS = ("alpha", "beta")
NO_DROP_KEYS = {"plain": ("alpha", "beta"), "random": ("beta",)}  # what an arm does not read (random: alpha only)


def resolve_dropout_settings(config: ml_collections.ConfigDict, given: Iterable[str]) -> list[str]:
    """clues.alpha / clues.beta given on the command line are used, never ignored: for every arm whose
    clues.chosen entry holds that key, the given value replaces it (logged). Where nothing would read them
    (the replication's grid chooses; clues.chosen outside the knowledge pipeline) they are refused."""
    given = set(given)
    clues, pipeline = config.get("clues"), config.get("pipeline")
    if not isinstance(clues, ml_collections.ConfigDict):
        return []
    chosen, arms = clues.get("chosen"), tuple(clues.get("arms", ()))
    chosen_given = sorted(k for k in given if k.startswith("clues.chosen."))
    errors = []
    if pipeline == "replicate" and chosen_given:
        errors.append(f"--config.{chosen_given[0]} is not read by the replicate pipeline (clues.chosen is the "
                      "knowledge pipeline's): the grid chooses alpha / beta, or with --config.grid.enabled=False "
                      "every arm takes --config.clues.alpha / --config.clues.beta")
    unused = [k for k in chosen_given if k.split(".")[2] not in arms]
    if pipeline == "knowledge" and unused:
        errors.append(f"--config.{unused[0]} is for an arm not in clues.arms={arms}")
    for key in DROP_KEYS:
        if f"clues.{key}" not in given:
            continue
        if not [arm for arm in arms if key not in NO_DROP_KEYS.get(arm, ())]:
            errors.append(f"--config.clues.{key} is read by no arm of clues.arms={arms} (plain drops nothing, "
                          "random reads alpha only)")
            continue
        if pipeline == "replicate" and _get(config, "grid.enabled"):
            errors.append(f"--config.clues.{key} is not used while grid.enabled=True (the grid chooses each arm's "
                          f"{key} from grid.{key}s on dev people): set --config.grid.enabled=False to use it, or "
                          f'--config.grid.{key}s="({clues[key]},)"')
            continue
        if pipeline != "knowledge" or not isinstance(chosen, ml_collections.ConfigDict):
            continue
        replaced = [arm for arm, setting in chosen.items() if isinstance(setting, ml_collections.ConfigDict)
                    and key in setting and arm in arms]
        both = [f"clues.chosen.{arm}.{key}" for arm in replaced if f"clues.chosen.{arm}.{key}" in given]
        if both:
            errors.append(f"--config.clues.{key} and --config.{both[0]} are both given: give one (clues.{key} "
                          f"sets every arm's {key}, clues.chosen.ARM.{key} one arm's)")
            continue
        for arm in replaced:
            chosen[arm][key] = clues[key]
        if replaced:
            log.info("--config.clues.%s=%s replaces clues.chosen's %s for %s", key, clues[key], key,
                     ", ".join(replaced))
    return errors


def check_config(config: ml_collections.ConfigDict, given: Iterable[str] = ()) -> None:
    """Raises one UserInputError line listing every bad value; fills data.source from the corpus flags.

    given: the dotted keys set on the command line (a setting given there is used or refused, never ignored).
    """
    resolve_corpus_source(config)
    errors = value_errors(config)
    if not errors:  # cross checks assume each value is of the right kind
        errors = cross_errors(config) + resolve_dropout_settings(config, given)
    if errors:
        raise UserInputError("; ".join(errors))


def user_files(config: ml_collections.ConfigDict) -> tuple[list[tuple[int, str]], list[dict[str, str]]]:
    """The user's corpus ((first line, document) rows) and QA pairs, read and checked whole; an error names
    file, line and the config key. The CLI calls it before the workdir is touched, the pipeline to read them."""
    from clue_jax.data import corpus
    from clue_jax.eval import qa_file  # its SQuAD normalisation pulls in scipy: only when a corpus is given

    try:
        rows = corpus.corpus_documents(config.data.corpus)
    except UserInputError as err:
        raise UserInputError(f"{err} (--config.data.corpus)") from None
    try:
        qa = qa_file.read_qa_file(config.data.qa_file)
    except UserInputError as err:
        raise UserInputError(f"{err} (--config.data.qa_file)") from None
    return rows, qa


def check_files(config: ml_collections.ConfigDict) -> None:
    """The user's files of a corpus run, checked before anything is written (see `user_files`)."""
    data = config.get("data")
    if config.get("pipeline") in CORPUS_PIPELINES and data is not None and data.get("source") == "corpus":
        user_files(config)
