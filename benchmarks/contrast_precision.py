"""How stable are the contrast ranks when the teachers score in bfloat16 instead of float32?

Before a pod user relies on `clues.teacher_dtype="bfloat16"`: the two base models of a finished
quickstart (knowledge pipeline) run score the run's training documents (the "test" people's bios, exactly the
rows cpt trains on) in float32 and in bfloat16 (`scoring.make_scorer(dtype=)`:
bf16 weights and matmuls; softmax and the sums stay float32), and the
contrast d = s_large - s_small of the two is compared per document:

- Spearman correlation of d over the document's real tokens (mean, 5th
  percentile, min over documents);
- overlap of the top-k clue sets (the k tokens ranked first, i.e. kept most
  surely), |A32 & A16| / k (mean, min);
- at the run's clues.alpha / clues.beta: the keep probabilities of both
  (`dropout.keep_probabilities`, protected tokens as in training), and the
  fraction of documents whose dropped-token set changes when both sides
  use the same random draws (mean over `--draws` draws: a token's fate
  differs where its uniform draw falls between the two keep probabilities),
  with its exact expectation under that coupling, 1 - prod_j (1 - |k32_j - k16_j|).

The float32 scores are also checked against the run's saved scores_test
stage (`stored_max_abs_diff`), so the documents are the ones it trained on.

    python benchmarks/contrast_precision.py --workdir runs/qs     # a finished quickstart workdir
    python benchmarks/contrast_precision.py --smoke               # tiny random teachers (tests)

Last stdout line: the JSON object; also benchmarks/results/contrast_precision.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from scipy import stats  # noqa: E402

from benchmarks import common  # noqa: E402
from clue_jax.clues import dropout, scoring  # noqa: E402

DTYPES = ("float32", "bfloat16")


def contrast(teachers: dict, docs: dict, dtype: str, query_block: int, batch: int) -> tuple[np.ndarray, dict]:
    """(d [N, T], {size: s [N, T]}) with both teachers scoring in `dtype`."""
    s = {size: scoring.score_corpus(scoring.make_scorer(teachers[size], dtype=dtype, query_block=query_block),
                                    docs["input_ids"], docs["attention_mask"], batch_size=batch)
         for size in ("large", "small")}
    return s["large"] - s["small"], s


def _summary(values: np.ndarray) -> dict:
    return {"mean": float(np.mean(values)), "p5": float(np.percentile(values, 5)), "min": float(np.min(values))}


def compare(d_ref: np.ndarray, d_new: np.ndarray, docs: dict, drop_cfg: dropout.DropoutConfig, *,
            top_k: int, draws: int, seed: int = 0) -> dict:
    """The rank-stability numbers of the module docstring for two contrast arrays of the same documents."""
    ids, mask = np.asarray(docs["input_ids"]), np.asarray(docs["attention_mask"])
    real = mask > 0
    rho = np.array([stats.spearmanr(a[m], b[m]).statistic for a, b, m in zip(d_ref, d_new, real)])
    rank_ref = np.asarray(dropout.descending_rank(jnp.asarray(d_ref), jnp.asarray(mask)))
    rank_new = np.asarray(dropout.descending_rank(jnp.asarray(d_new), jnp.asarray(mask)))
    k = np.minimum(top_k, real.sum(-1))
    overlap = np.sum((rank_ref < k[:, None]) & (rank_new < k[:, None]) & real, axis=-1) / k

    protected = dropout.protected_mask(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(drop_cfg.protected_ids,
                                                                                          jnp.int32))
    keep = [np.asarray(dropout.keep_probabilities(jnp.asarray(d), jnp.asarray(mask), protected, drop_cfg.alpha,
                                                  drop_cfg.beta, "contrast")) for d in (d_ref, d_new)]
    u = np.asarray(jax.random.uniform(jax.random.key(seed), (draws, *mask.shape)))
    dropped = [(u >= kp) & real for kp in keep]  # bernoulli(keep) keeps where u < keep; the same u on both sides
    changed = np.any(dropped[0] != dropped[1], axis=-1)  # [draws, N]
    gap = np.where(real, np.abs(keep[0] - keep[1]), 0.0)
    return {
        "documents": int(len(d_ref)),
        "tokens": int(real.sum()),
        "spearman": _summary(rho),
        "top_k": int(top_k),
        "top_k_overlap": {"mean": float(overlap.mean()), "min": float(overlap.min())},
        "rank_changed_fraction": float(np.mean((rank_ref != rank_new)[real])),
        "keep_probability_max_abs_diff": float(gap.max()),
        "dropped_set_changed_fraction": float(changed.mean()),
        "dropped_set_changed_expected": float(np.mean(1.0 - np.prod(1.0 - gap, axis=-1))),
        "draws": int(draws),
        "alpha": drop_cfg.alpha,
        "beta": drop_cfg.beta,
    }


def from_workdir(workdir: str):
    """(teachers, training documents, DropoutConfig, clues settings, stored float32 scores) of a quickstart run."""
    import ml_collections

    from clue_jax.data.tokenizer import load_tokenizer
    from clue_jax.errors import UserInputError
    from clue_jax.models import factory
    from clue_jax.pipelines import continual, knowledge_data
    from clue_jax.pipelines.stages import Stages
    from clue_jax.parallel import mesh as mesh_lib

    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    stages = Stages(workdir)
    needed = ("world", "tokenizer", "pretrain_small", "pretrain_large")
    missing = [n for n in needed if not os.path.exists(os.path.join(stages.path(n), "done.json"))]
    if config.get("pipeline") != "knowledge" or missing:
        raise UserInputError(f"--workdir {workdir}: not a finished knowledge-pipeline run (missing {missing})")
    result = {n: stages._read_result(n) for n in needed}
    tokenizer = load_tokenizer(result["tokenizer"]["path"])
    split = knowledge_data.knowledge_splits(config, stages.path("world"))["test"]
    docs = knowledge_data.documents_data(tokenizer, split, config.cpt.seq_len)
    mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
    teachers = {size: factory.load_params(result[f"pretrain_{size}"]["model_dir"], mesh)[0]
                for size in ("small", "large")}
    stored = os.path.join(stages.path("scores_test"), "scores.npz")
    stored = dict(np.load(stored)) if os.path.exists(stored) and config.clues.teacher_dtype == "float32" else None
    return teachers, docs, continual.dropout_config(config, "contrast", tokenizer), config.clues, stored


def smoke_setup():
    """Two tiny random LLaMA-style teachers and random documents with right padding."""
    from clue_jax.models import config as model_config
    from clue_jax.models.causal_lm import CausalLM

    small = model_config.llama(vocab_size=64, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64,
                               max_len=32)
    large = model_config.llama(vocab_size=64, d_model=48, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=96,
                               max_len=32)
    teachers = {"small": CausalLM(small, rngs=nnx.Rngs(0)), "large": CausalLM(large, rngs=nnx.Rngs(1))}
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 64, (6, 24)).astype(np.int32)
    mask = (np.arange(24)[None] < rng.integers(12, 25, (6, 1))).astype(np.int32)
    drop_cfg = dropout.DropoutConfig(method="contrast", alpha=0.7, beta=0.03, protected_ids=(1, 2))
    clues = {"query_block": 8, "score_batch": 4}
    return teachers, {"input_ids": ids * mask, "attention_mask": mask}, drop_cfg, clues, None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="", help="a finished quickstart (knowledge pipeline) workdir")
    parser.add_argument("--smoke", action="store_true", help="tiny random teachers (tests)")
    parser.add_argument("--top-k", type=int, default=10, help="size of the compared clue sets")
    parser.add_argument("--draws", type=int, default=10, help="coupled dropout draws per document")
    parser.add_argument("--results-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    args = parser.parse_args()
    if not args.smoke and not args.workdir:
        parser.error("give --workdir (a finished quickstart run) or --smoke")
    teachers, docs, drop_cfg, clues, stored = smoke_setup() if args.smoke else from_workdir(args.workdir)
    d, scores = {}, {}
    for dtype in DTYPES:
        d[dtype], scores[dtype] = contrast(teachers, docs, dtype, int(clues["query_block"]),
                                           int(clues["score_batch"]))
    result = {"benchmark": "contrast_precision", "smoke": args.smoke, "workdir": args.workdir or None,
              "machine": common.machine_info(), "devices": str(jax.devices()[0].platform),
              "teacher_params": {s: int(sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param))))
                                 for s, m in teachers.items()},
              **compare(d["float32"], d["bfloat16"], docs, drop_cfg, top_k=args.top_k, draws=args.draws),
              "score_max_abs_diff": {s: float(np.abs(scores["float32"][s] - scores["bfloat16"][s]).max())
                                     for s in ("large", "small")},
              "stored_max_abs_diff": None if stored is None else float(max(
                  np.abs(scores["float32"][s] - stored[s]).max() for s in ("large", "small")))}
    print(f"{result['documents']} documents: Spearman of d, bf16 vs float32: mean {result['spearman']['mean']:.4f}, "
          f"p5 {result['spearman']['p5']:.4f}, min {result['spearman']['min']:.4f}; top-{args.top_k} overlap "
          f"{result['top_k_overlap']['mean']:.3f}; dropped set changes in "
          f"{result['dropped_set_changed_fraction']:.1%} of documents per draw")
    common.write_result("contrast_precision_smoke" if args.smoke else "contrast_precision", result, args.results_dir)


if __name__ == "__main__":
    main()
