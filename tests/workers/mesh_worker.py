"""Pre-training and clue-dropout continual pre-training of a tiny model on given meshes, for test_multihost.py.

usage: mesh_worker.py OUT SHAPE [SHAPE ...]     (SHAPE like 1,1,2)
       mesh_worker.py OUT --wrong-batch         (a source that splits rows by process index alone)

Started once per process with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID, or imported (`train_on_mesh`) for the 1-process reference.
Process 0 writes OUT/result.json ({shape: {"pretrain": losses, "cpt": losses,
"scores": teacher scores of a corpus, "params": final parameters}}); a refused batch exits 2 with `error: ...`
like `python -m clue_jax.main`.
"""
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from clue_jax.clues import dropout, scoring
from clue_jax.data.batching import ArrayBatchSource, ConcatBatchSource
from clue_jax.errors import UserInputError
from clue_jax.models import config as model_config
from clue_jax.models.causal_lm import CausalLM
from clue_jax.parallel import mesh
from clue_jax.train import defaults, loop, objectives

BATCH, SEQ, VOCAB = 4, 16, 64
DROP = dropout.DropoutConfig(method="contrast", alpha=0.7, beta=0.05, original_fraction=0.25, protected_ids=(1,),
                             pad_id=0)


def _data(n, seed, scores):
    rng = np.random.default_rng(seed)
    start = rng.integers(2, VOCAB - SEQ, size=(n, 1))
    out = {"input_ids": ((start + np.arange(SEQ)[None]) % VOCAB).astype(np.int32),
           "attention_mask": np.ones((n, SEQ), np.int32)}
    for key in ("scores_large", "scores_small"):  # cached teacher scores (replay rows carry zeros)
        out[key] = rng.random((n, SEQ), dtype=np.float32) if scores else np.zeros((n, SEQ), np.float32)
    return out


def _train_cfg(steps):
    return defaults.train_config(steps=steps, batch_size=BATCH, lr=3e-3, warmup_steps=1, log_every=2,
                                 checkpoint_every=4, keep_checkpoints=2)


def _losses(log_dir, stage):
    path = os.path.join(log_dir, "metrics.jsonl")
    if not os.path.exists(path):  # only process 0 writes metrics
        return None
    return [(r["step"], r["loss"], r["input_tokens"]) for r in map(json.loads, open(path)) if r["stage"] == stage]


def _host_params(model):
    state = nnx.state(model, nnx.Param)
    return {jax.tree_util.keystr(k): np.asarray(multihost_utils.process_allgather(v, tiled=True)).tolist()
            for k, v in jax.tree_util.tree_leaves_with_path(state)}


def train_on_mesh(shape, devices, workdir):
    """{"pretrain": [(step, loss, input_tokens)], "cpt": [...], "scores": [N, T], "params": {name: values}} (losses None off process 0)."""
    m = mesh.make_mesh(shape, devices)
    cfg = model_config.llama(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=64)
    pre = loop.Trainer(CausalLM(cfg, rngs=nnx.Rngs(0)), objectives.causal_lm, _train_cfg(4), m,
                       os.path.join(workdir, "pretrain"), meta={"model": cfg.to_dict()}, stage="pretrain",
                       log_dir=workdir)
    model = pre.run(ArrayBatchSource(_data(32, 0, scores=False), BATCH, seed=0)).model
    docs = _data(6, 4, scores=False)  # the teacher's scores of a corpus that every process has whole
    scores = scoring.score_corpus(scoring.make_scorer(model, mesh=m, query_block=8), docs["input_ids"],
                                  docs["attention_mask"], batch_size=BATCH)
    # Continual pre-training: new documents (with teacher scores) + replay rows, clue dropout inside the step.
    source = ConcatBatchSource([(_data(16, 1, scores=True), BATCH // 2), (_data(16, 2, scores=False), BATCH // 2)],
                               seed=3)
    cpt = loop.Trainer(model, objectives.causal_lm, _train_cfg(4), m, os.path.join(workdir, "cpt"),
                       transform=lambda rng, batch, extras: dropout.augment_batch(rng, batch, None, DROP),
                       meta={"model": cfg.to_dict()}, stage="cpt", log_dir=workdir)
    result = cpt.run(source)
    return {"pretrain": _losses(workdir, "pretrain"), "cpt": _losses(workdir, "cpt"),
            "scores": scores.tolist(), "params": _host_params(result.model)}


class PerProcessSource(ArrayBatchSource):
    """The old split: each process takes batch_size / process_count rows by its index, whatever the mesh."""

    def batch(self, step, rows=None):
        idx = self.global_indices(step)
        per_host = self.batch_size // jax.process_count()
        mine = idx[jax.process_index() * per_host:(jax.process_index() + 1) * per_host]
        return {k: v[mine] for k, v in self.arrays.items()}


def wrong_batch(workdir):
    m = mesh.make_mesh((1, 1, 2), jax.devices())
    cfg = model_config.llama(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=64)
    trainer = loop.Trainer(CausalLM(cfg, rngs=nnx.Rngs(0)), objectives.causal_lm, _train_cfg(2), m, workdir,
                           meta={"model": cfg.to_dict()})
    trainer.run(PerProcessSource(_data(32, 0, scores=False), BATCH, seed=0))


def main():
    from clue_jax import distributed

    out, args = sys.argv[1], sys.argv[2:]
    distributed.maybe_initialize("auto")
    workdir = os.path.join(out, "work")  # shared by the processes, as a pod's workdir is
    if args == ["--wrong-batch"]:
        wrong_batch(workdir)
        return
    results = {}
    for text in args:
        shape = tuple(int(s) for s in text.split(","))
        results[text] = train_on_mesh(shape, jax.devices(), os.path.join(workdir, text))
    if jax.process_index() == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    try:
        main()
    except UserInputError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
