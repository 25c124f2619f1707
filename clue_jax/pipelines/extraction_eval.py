"""The extraction pipeline's evaluation stages: the base model k-shot, a fine-tuned model zero-shot, and a
fine-tuned model mixed with the base model (decoding and candidate ranking), lambda chosen on dev."""
from __future__ import annotations

import json
import logging
import os
import time

import jax

from clue_jax import workdir_fs
from clue_jax.extraction import baselines, gate, mixing, seed_stats, shock_size
from clue_jax.extraction.answers import (candidate_scores, decode_answers, decode_mixture_answers, mixed_ranking,
                                         ranked_predictions)
from clue_jax.extraction.arm_metrics import arm_metrics, exact_match_rate
from clue_jax.models import factory

log = logging.getLogger("clue_jax")

MIX_NAME = {"vanilla": "mixing", "mixture": "both"}
SPLITS = ("dev", "test")


def load_model(model_dir: str, mesh, precision: str = "checkpoint"):
    """A clue_jax model directory (save_params) or a Hugging Face checkpoint directory, in `precision`'s dtypes."""
    return factory.load_params(model_dir, mesh, precision=precision)


def measure(ctx, items, preds) -> dict:
    return arm_metrics(items, preds, ctx["freqs"], ctx["threshold"], ctx["smoothing"], ctx["candidates"], ctx["skew"],
                       ctx["null_draws"], ctx["null_seed"])


def write_predictions(path: str, preds: dict) -> None:
    if jax.process_index() == 0:
        with workdir_fs.open_write(path) as f:
            json.dump(preds, f)


def read_predictions(path: str) -> dict:
    return json.loads(workdir_fs.read_text(path))


def eval_base_stage(config, ctx, base_dir, mesh, stage_dir):
    model, _ = load_model(base_dir, mesh)
    e, res, preds = config.eval, {}, {}
    scores = {}
    for split in SPLITS:
        items, seqs = ctx["items"][split], ctx["base_seqs"][split]
        preds[split] = decode_answers(model, ctx["tokenizer"], ctx["base_pad"][split], e, ctx["stops"])
        res[split] = {"base": {**measure(ctx, items, preds[split]), "dev_exact_match": exact_match_rate(ctx["items"]["dev"], preds["dev"])}}
        if e.ranking:
            scores[split] = candidate_scores(model, ctx["tokenizer"], seqs, items, ctx["candidates"], e.score_batch)
            preds[f"rank_{split}"] = ranked_predictions(items, ctx["candidates"], scores[split])
            res[split]["rank:base"] = {**measure(ctx, items, preds[f"rank_{split}"]),
                                       "dev_exact_match": exact_match_rate(ctx["items"]["dev"], preds["rank_dev"])}
    write_predictions(os.path.join(stage_dir, "predictions.json"), preds)
    if e.ranking and jax.process_index() == 0:
        workdir_fs.save_npz(os.path.join(stage_dir, "scores.npz"),
                 **{f"{s}__{rel}": m for s, by_rel in scores.items() for rel, m in by_rel.items()})
    return {"metrics": res, "predictions": os.path.join(stage_dir, "predictions.json"),
            "scores": os.path.join(stage_dir, "scores.npz") if e.ranking else ""}


def eval_zero_shot_stage(config, ctx, ft_dir, mesh, stage_dir):
    """One fine-tuned model zero-shot on dev and test by greedy decoding (a point of the steps sweep)."""
    model, _ = load_model(ft_dir, mesh)
    preds = {s: decode_answers(model, ctx["tokenizer"], ctx["ft_pad"][s], config.eval, ctx["stops"]) for s in SPLITS}
    write_predictions(os.path.join(stage_dir, "predictions.json"), preds)
    return {"metrics": {**measure(ctx, ctx["items"]["test"], preds["test"]),
                        "dev_exact_match": exact_match_rate(ctx["items"]["dev"], preds["dev"])},
            "predictions": os.path.join(stage_dir, "predictions.json")}


def eval_ft_stage(config, ctx, kind, ft_dir, base_dir, base_eval, mesh, stage_dir, zero_shot: str = ""):
    """The fine-tuned model alone, and mixed with the base model (decoding and ranking), lambda on dev.

    `zero_shot`: predictions.json of an eval_zero_shot_stage of this model, reused instead of decoding again."""
    ft_model, _ = load_model(ft_dir, mesh)
    base_model, _ = load_model(base_dir, mesh)
    e, tok = config.eval, ctx["tokenizer"]
    items, ft_pad, base_pad = ctx["items"], ctx["ft_pad"], ctx["base_pad"]
    mix_name = MIX_NAME[kind]
    t0 = time.time()
    if zero_shot:
        preds = {s: {kind: p} for s, p in read_predictions(zero_shot).items()}
    else:
        preds = {s: {kind: decode_answers(ft_model, tok, ft_pad[s], e, ctx["stops"])} for s in SPLITS}
    log.info("eval_%s: zero-shot decoding %.0f s", kind, time.time() - t0)
    sweeps, lambdas = {"decode": {}, "rank": {}}, {}
    dev_em = {kind: exact_match_rate(items["dev"], preds["dev"][kind])}

    def mixed_decode(split, lam, mode):
        return decode_mixture_answers(ft_model, base_model, tok, ft_pad[split], base_pad[split], lam, mode, e,
                               ctx["stops"])

    for mode in config.mixing.modes:
        arm = f"{mix_name}/{mode}"
        lam, scores = mixing.choose_lambda(lambda l: exact_match_rate(items["dev"], mixed_decode("dev", l, mode)),
                                           tuple(config.mixing.grid))
        sweeps["decode"][mode] = {str(k): v for k, v in scores.items()}
        lambdas[arm], dev_em[arm] = lam, scores[lam]
        preds["test"][arm] = mixed_decode("test", lam, mode)
        log.info("eval_%s: %s decoding sweep done (lambda %g) at %.0f s", kind, mode, lam, time.time() - t0)

    if e.ranking:
        base_scores = workdir_fs.load_npz(base_eval["scores"])
        pt = {s: {rel: base_scores[f"{s}__{rel}"] for rel in ctx["candidates"] if f"{s}__{rel}" in base_scores}
              for s in SPLITS}
        ft = {s: candidate_scores(ft_model, tok, ctx["ft_seqs"][s], items[s], ctx["candidates"], e.score_batch)
              for s in SPLITS}
        preds["test"][f"rank:{kind}"] = ranked_predictions(items["test"], ctx["candidates"], ft["test"])
        dev_em[f"rank:{kind}"] = exact_match_rate(items["dev"], ranked_predictions(items["dev"], ctx["candidates"], ft["dev"]))
        for mode in config.mixing.modes:
            arm = f"rank:{mix_name}/{mode}"
            lam, scores = mixing.choose_lambda(
                lambda l: exact_match_rate(items["dev"], mixed_ranking(items["dev"], ctx["candidates"], ft["dev"], pt["dev"], l,
                                                          mode)), tuple(config.mixing.rank_grid))
            sweeps["rank"][mode] = {str(k): v for k, v in scores.items()}
            lambdas[arm], dev_em[arm] = lam, scores[lam]
            preds["test"][arm] = mixed_ranking(items["test"], ctx["candidates"], ft["test"], pt["test"], lam, mode)
        log.info("eval_%s: candidate ranking done at %.0f s", kind, time.time() - t0)

    res = {arm: measure(ctx, items["test"], p) for arm, p in preds["test"].items()}
    for arm, value in dev_em.items():
        res[arm]["dev_exact_match"] = value
    for arm, lam in lambdas.items():
        res[arm]["lambda"] = lam
    write_predictions(os.path.join(stage_dir, "predictions.json"), preds["test"])
    return {"metrics": res, "sweeps": sweeps, "predictions": os.path.join(stage_dir, "predictions.json")}


def knowledge_free_stage(ctx, finetune_items, prior_items, seeds, stage_info) -> dict:
    """The knowledge-free predictors scored as arms, the extraction gate on the left-out questions, and the shock
    size of every fine-tuned arm and predictor: {"knowledge_free", "gate", "shock_size"} for summary.json.

    Needs no model: the fine-tuned arms' test predictions are read from their eval stages' predictions.json."""
    test = ctx["items"]["test"]
    keys = [str(s) for s in seeds]
    free = {str(s): baselines.knowledge_free_predictions(test, finetune_items, prior_items, int(s)) for s in seeds}
    by_name = {name: {s: free[s][name] for s in keys} for name in baselines.NAMES}
    per_arm: dict[str, dict[str, list[str]]] = {}
    for s in keys:
        for kind in ("vanilla", "mixture"):
            for arm, preds in read_predictions(stage_info[f"eval_{kind}_s{s}"]["predictions"]).items():
                per_arm.setdefault(arm, {})[s] = preds
    knowledge_free = {name: {"per_seed": {s: measure(ctx, test, p) for s, p in runs.items()}}
                      for name, runs in by_name.items()}
    for entry in knowledge_free.values():
        entry.update(seed_stats.mean_std(list(entry["per_seed"].values())))
    smoothing = ctx["smoothing"]
    sizes = {arm: shock_size.shock_size(test, runs, ctx["skew"], smoothing)
             for arm, runs in {**per_arm, **by_name}.items() if set(runs) == set(keys)}
    return {"knowledge_free": knowledge_free,
            "gate": gate.extraction_gate(test, per_arm["vanilla"], by_name, ctx["skew"]["dropped_objects"]),
            "shock_size": sizes}
