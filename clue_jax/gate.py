"""The teacher gate for any pair: does the contrast mark the tokens the questions rely on, beyond seed noise?

    python -m clue_jax.gate --small DIR --large DIR --workdir W --corpus F --qa F
                            [--small DIR2 --large DIR2 ...] [--tokenizer DIR] [--k 10] [--level 0.05]

Each --small / --large is a teacher (an HF checkpoint directory or a stage's
`model/` directory); repeat them for seeds of one size and recipe. The
documents of --corpus (.txt or .jsonl) are scored by every teacher; the
targets are the tokens the --qa questions rely on (clue_jax.clues.gate_targets:
a question's `name` where every line has one, else its words, stop words
aside). For every large/small pair: the targets' share among the top-k
contrast tokens, ranked as clue dropout ranks them, their mean rank, and the
attention mass on them from the token before the answer; each against chance
and against the same statistics of the same-size pairs (the null,
clue_jax.clues.gate_stats). `passed` is true only beyond both; with one seed
per size there is no null and it is null. A random-init small teacher gives
the negative control. Writes W/gate.json and W/views/doc_*.html (contrast
of the seed means, targets boxed). Bad input is one line and exit 2.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys

import jax
import numpy as np
from flax import nnx

from clue_jax import workdir_fs
from clue_jax.clues import gate_stats, gate_targets, render, scoring
from clue_jax.data import corpus as corpus_lib
from clue_jax.data import tokenizer as tokenizer_lib
from clue_jax.errors import UserInputError
from clue_jax.eval import qa_file
from clue_jax.models import factory
from clue_jax.models.causal_lm import CausalLM

USAGE = "python -m clue_jax.gate --small DIR --large DIR --workdir W --corpus F --qa F"
STATISTICS = {  # name: (what it says, higher_is_more)
    "top_k_share": ("targets' share among the top-{k} contrast tokens", True),
    "mean_rank": ("targets' mean contrast rank (0 first, 1 last)", False),
    "far_query": ("attention mass on the targets from the token before the answer, large - small", True),
}


def _model_config(directory: str, flag: str):
    if not workdir_fs.exists(directory):
        raise UserInputError(f"{flag} {directory}: no such directory")
    if not (workdir_fs.exists(workdir_fs.join(directory, "model_config.json")) or factory.is_hf_directory(directory)):
        raise UserInputError(f"{flag} {directory}: not a model directory (no model_config.json or config.json)")
    return factory.read_config(directory)


def _tokenizer(args):
    path = args.tokenizer or args.small[0]
    try:
        tok = tokenizer_lib.load_tokenizer(path)
    except UserInputError as err:
        raise UserInputError(f"{'--tokenizer' if args.tokenizer else '--small'}: {err}; give the teachers' "
                             "tokenizer directory with --tokenizer") from None
    keys = {f"--small {d}": d for d in args.small} | {f"--large {d}": d for d in args.large}
    tokenizer_lib.require_same_tokenizer({"--tokenizer": path, **keys})
    return tok


@functools.partial(jax.jit, static_argnums=0)
def _scores_and_rows(graphdef, state, ids, mask, query):
    """Received attention and the far query's attention row; one compilation per architecture, not per seed."""
    model = nnx.merge(graphdef, state)
    return scoring.received_attention(model, ids, mask), scoring.attention_from_query(model, ids, mask, query)


_GRAPHS: dict = {}  # {model config: graph}: two instances' graphs never compare equal, one per config does


def _teacher_outputs(model, ids, mask, query, batch_size: int) -> dict:
    """Scores and far-query rows of one teacher; one compilation per architecture, not per seed."""
    graphdef, state = nnx.split(model)
    graphdef = _GRAPHS.setdefault(model.cfg, graphdef)
    pad = (-len(ids)) % batch_size  # fixed [batch_size, T] batches: one compilation
    ids, mask, query = (np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in (ids, mask, query))
    outs = [_scores_and_rows(graphdef, state, ids[s:s + batch_size], mask[s:s + batch_size], np.maximum(query[s:s + batch_size], 0))
            for s in range(0, len(ids), batch_size)]
    n = len(ids) - pad
    scores = np.concatenate([np.asarray(o[0]) for o in outs])[:n]
    return {"scores": scoring.check_finite(scores, "gate"), "rows": np.concatenate([np.asarray(o[1]) for o in outs])[:n]}


def _statistics(mask, targets, query, k: int):
    def method(a, b):
        return gate_stats.method_statistic(a["scores"], b["scores"], mask, targets, k)

    chance = gate_stats.method_statistic(np.zeros(mask.shape), np.zeros(mask.shape), mask, targets, k)["chance"]
    return {
        "top_k_share": (lambda a, b: method(a, b)["top_k_share"], chance),
        "mean_rank": (lambda a, b: method(a, b)["mean_rank"], 0.5),
        "far_query": (lambda a, b: gate_stats.far_query_statistic(a["rows"], b["rows"], targets, query)
                      ["mass_difference"], 0.0),
    }


def gate(args) -> dict:
    """Validates everything, scores every teacher, and returns the gate.json record."""
    configs = {(flag, d): _model_config(d, flag) for flag, dirs in (("--small", args.small), ("--large", args.large))
               for d in dirs}
    tok = _tokenizer(args)
    for (flag, d), cfg in configs.items():
        if cfg.vocab_size < len(tok):
            raise UserInputError(f"{flag} {d}: vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                                 f"{len(tok)} tokens: not the teachers' tokenizer")
    docs = [text for _, text in corpus_lib.corpus_documents(args.corpus)]
    links = gate_targets.link_questions(docs, qa_file.read_qa_file(args.qa))
    lengths = [len(ids) + 1 for ids in tok(docs, add_special_tokens=False)["input_ids"]]
    length = min([max(lengths)] + [cfg.max_len for cfg in configs.values()])
    ids, mask = tokenizer_lib.encode_batch(tok, docs, length, on_overflow="truncate")
    targets, query = gate_targets.token_masks(tok, docs, links, length)
    if not targets.any():
        raise UserInputError(f"--qa {args.qa}: no document of --corpus {args.corpus} holds a target token (each "
                             f"question is tied to the documents containing its {'name' if links.kind == 'names' else 'answer'})")
    from clue_jax.parallel.mesh import make_mesh

    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    outputs = {"small": [], "large": []}
    for (flag, d) in configs:
        model, _ = factory.load_params(d, mesh)
        outputs[flag.lstrip("-")].append(_teacher_outputs(model, ids, mask, query, args.batch_size))
        del model
    untrained = CausalLM(configs[("--small", args.small[0])], rngs=nnx.Rngs(args.control_seed))  # one device
    control_out = [_teacher_outputs(untrained, ids, mask, query, args.batch_size)]
    stats, control = {}, {}
    measured = _statistics(mask, targets, query, args.k)
    far_measured = ((query > 0) & (targets.sum(-1) > 0)).any()  # an answer found in a document with targets
    for name, (fn, chance) in measured.items():
        if name == "far_query" and not far_measured:
            stats[name] = control[name] = None
            continue
        stats[name] = gate_stats.calibrate(fn, outputs["large"], outputs["small"], chance, args.level,
                                           higher_is_more=STATISTICS[name][1])
        control[name] = gate_stats.negative_control(fn, outputs["large"], control_out, stats[name])
    passed, reason = gate_stats.verdict(stats)
    views = _views(args, tok, docs, ids, mask, targets, outputs)
    return {"passed": passed, "reason": reason, "targets": links.kind, "k": args.k, "level": args.level,
            "teachers": {"small": args.small, "large": args.large, "tokenizer": args.tokenizer or args.small[0]},
            "documents": {"total": len(docs), "with_targets": int((targets.sum(-1) > 0).sum()),
                          "with_far_query": int(((query > 0) & (targets.sum(-1) > 0)).sum()),
                          "questions": links.questions, "unmatched_questions": links.unmatched,
                          "length": length, "truncated": int(sum(n > length for n in lengths))},
            "statistics": stats, "control": control, "pairs": stats["top_k_share"]["pairs"], "views": views}


def _views(args, tok, docs, ids, mask, targets, outputs) -> list[str]:
    """HTML views of the first documents with targets: the contrast of the seed means, targets boxed."""
    out_dir = workdir_fs.join(args.workdir, "views")
    workdir_fs.path(out_dir).mkdir(parents=True, exist_ok=True)
    large = np.mean([o["scores"] for o in outputs["large"]], axis=0)
    small = np.mean([o["scores"] for o in outputs["small"]], axis=0)
    paths = []
    for i in [i for i in range(len(docs)) if targets[i].any()][: args.views]:
        n = int(mask[i].sum())
        tokens = [tok.decode([int(t)]) for t in ids[i, :n]]
        path = workdir_fs.join(out_dir, f"doc_{i}.html")
        paths.append(render.render_html(tokens, large[i, :n], small[i, :n], large[i, :n] - small[i, :n], path,
                                        title=f"gate: document {i}", marked=targets[i, :n]))
    return paths


def describe(record: dict) -> list[str]:
    """One line per statistic (value, chance, null, p), then `passed`."""
    n_l, n_s = len(record["teachers"]["large"]), len(record["teachers"]["small"])
    docs = record["documents"]
    lines = [f"teacher gate: {n_l} large x {n_s} small teachers, {docs['with_targets']} of {docs['total']} "
             f"documents with targets ({record['targets']})"]
    for name, s in record["statistics"].items():
        if s is None:
            lines.append(f"{STATISTICS[name][0].format(k=record['k'])}: not measured (no answer occurs in a "
                         "document with targets)")
            continue
        null = ", ".join(f"{v:+.4f}" for v in s["null"]) or "none"
        p = "n/a" if s["p"] is None else f"{s['p']:.3f}"
        lines.append(f"{STATISTICS[name][0].format(k=record['k'])}: {s['statistic']:+.4f} (chance "
                     f"{s['chance']:+.4f}; untrained-small control {record['control'][name]['statistic']:+.4f}); "
                     f"same-size null: {null}; p = {p}")
    verdict = {True: "true", False: "false", None: "null"}[record["passed"]]
    return lines + [f"passed: {verdict} ({record['reason']})"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (through run), like every other bad input
        raise UserInputError(f"{message} (usage: {USAGE})")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m clue_jax.gate", description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="append", required=True,
                        help="small teacher directory (HF checkpoint or a stage's model/); repeat for seeds")
    parser.add_argument("--large", action="append", required=True, help="large teacher directory; repeat for seeds")
    parser.add_argument("--workdir", required=True, help="where gate.json and views/ are written")
    parser.add_argument("--corpus", required=True, help="documents: .txt (blank-line separated) or .jsonl (text)")
    parser.add_argument("--qa", required=True, help='questions: JSONL {"question", "answer"[, "name"]}')
    parser.add_argument("--tokenizer", default="", help="the teachers' tokenizer (default: the first --small)")
    parser.add_argument("--k", type=int, default=10, help="top-k contrast tokens (default 10)")
    parser.add_argument("--level", type=float, default=0.05, help="permutation test level (default 0.05)")
    parser.add_argument("--views", type=int, default=3, help="documents rendered as HTML (default 3)")
    parser.add_argument("--batch_size", type=int, default=8, help="documents scored at once (default 8)")
    parser.add_argument("--control_seed", type=int, default=0, help="seed of the untrained small teacher")
    parser.add_argument("--verbose", action="store_true", help="show the log and tracebacks")
    args = parser.parse_args(argv)
    for flag, value, low in (("--k", args.k, 1), ("--batch_size", args.batch_size, 1), ("--views", args.views, 0)):
        if value < low:
            raise UserInputError(f"{flag}={value} must be >= {low}")
    if not 0.0 < args.level < 1.0:
        raise UserInputError(f"--level={args.level} must be in (0, 1)")
    record = gate(args)
    print("\n".join(describe(record)))
    path = workdir_fs.join(args.workdir, "gate.json")
    workdir_fs.write_text(path, json.dumps(record, indent=1, default=_plain))
    print(f"wrote {path} and {len(record['views'])} views in {workdir_fs.join(args.workdir, 'views')}")
    return 0


def _plain(x):
    return x.tolist() if isinstance(x, np.ndarray) else float(x)


def run() -> None:
    """Console entry point: bad input is one line and exit 2."""
    verbose = "--verbose" in sys.argv[1:]
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        code = main(sys.argv[1:])
    except UserInputError as err:
        if verbose:
            raise
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    run()
