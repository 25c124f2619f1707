"""The optax training loop every pipeline shares.

One jitted step with explicit in/out shardings and donated state runs on a
mesh from config. The step (1) derives its RNG from (seed key, step), so a
resumed run replays exactly; (2) optionally transforms the batch inside jit
(clue dropout, live teacher scoring) with frozen `extras` that never enter
the gradient; (3) accumulates gradients over micro-batches with `lax.scan`,
each device keeping its share of every micro-batch (`split_micro`);
(4) applies AdamW to gradients cast back to their parameters' dtypes, so the
state's dtypes are a fixed point of the step (checked after the first step:
otherwise the step would compile twice, lose its donation, and a bf16 run's
checkpoint would not restore onto a fresh state). Activations are pinned to
the mesh while the step is traced (`clue_jax.parallel.rules`). Each process loads the rows of every global batch that
its devices hold (`batching.process_rows`, from the batch sharding) and they
become global arrays of the configured batch shape, so the same code runs per
host on a pod, whichever mesh axes span the hosts.

Metrics stay on the device between log boundaries (every `log_every` steps,
and before every save, evaluation and preemption stop): they are fetched in
one transfer there, every step's loss is checked for NaN/Inf before anything
is saved, and only then is the cross-process preemption flag exchanged, so
no step waits on the host.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
import zlib
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from clue_jax.data import batching
from clue_jax.errors import UserInputError
from clue_jax.models import attention, layers, precision
from clue_jax.parallel import rules as shard_lib
from clue_jax.models.store import abstract_like
from clue_jax.train.checkpoint import Checkpointer
from clue_jax.train.logging_utils import MetricsWriter, Progress
from clue_jax.train.optim import learning_rate_schedule, make_optimizer

log = logging.getLogger("clue_jax")


class BatchSource(Protocol):
    """Deterministic batches: `batch(step, rows)` is the same on every rerun.

    `rows` are the positions in the global batch this process's devices hold
    (ascending); the source returns exactly those rows. Making the data
    position a pure function of the step is what lets a resumed run see
    exactly the batches an uninterrupted one would.
    """

    def batch(self, step: int, rows: np.ndarray) -> dict[str, np.ndarray]: ...


class NonFiniteLoss(UserInputError):
    """The loss became NaN or Inf; the last good checkpoint is left as it was."""


@dataclasses.dataclass
class TrainResult:
    model: nnx.Module
    step: int
    status: str  # "done" or "preempted"
    metrics: dict


class _Preemption:
    """SIGTERM sets a flag; the loop saves and stops at the next step (one process) or log boundary.

    With several processes the flag is exchanged only at log boundaries (every
    process stops at the same step); jax's own preemption notice
    (`reached_preemption_sync_point`, a local check) is read every step.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        log.warning("%s received: saving a checkpoint and stopping", signal.Signals(signum).name)
        self.requested = True

    def should_stop(self, step: int, boundary: bool) -> bool:
        if jax.process_count() == 1:
            return self.requested
        stop = multihost_utils.reached_preemption_sync_point(step)
        if boundary:  # the same steps on every process, so every process joins this collective
            stop |= bool(multihost_utils.process_allgather(np.int32(self.requested)).max() > 0)
        return stop

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def split_micro(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B / n, ...], micro-batch m taking rows m, m + n, m + 2n, ...

    Each device holds a contiguous block of B / (data*fsdp) rows, a multiple
    of n (checked at construction), so taking every n-th row gives every
    device its share of every micro-batch without moving a byte; the
    constraint keeps the B / n axis split over (data, fsdp) through the scan.
    (Consecutive rows per micro-batch would put each one on a fraction of the
    devices, and XLA would either move the batch or run each micro-batch whole
    on every device.)
    """
    def one(v):
        v = jnp.swapaxes(v.reshape(v.shape[0] // n, n, *v.shape[1:]), 0, 1)
        return shard_lib.constrain(v, (None, "activation_batch") + (None,) * (v.ndim - 2))

    return {k: one(v) for k, v in batch.items()}


def _dtypes(tree) -> list:
    return [(jax.tree_util.keystr(path), str(leaf.dtype))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree) if hasattr(leaf, "dtype")]


class StateDrift(RuntimeError):
    """The train step changed the dtype of the state it was given (it would recompile and resume wrongly)."""


class Trainer:
    """Trains `model` with `objective` on a mesh; checkpoints into `workdir/checkpoints`.

    trainable: nnx filter of what the optimizer updates (nnx.Param, or
      nnx.LoRAParam for LoRA students); everything else stays frozen.
    transform: optional `fn(rng, batch, extras) -> batch` run inside the step
      before the loss (clue dropout); `extras` (e.g. teacher states) are
      passed as jit arguments under stop_gradient.
    meta: JSON-able description saved with each checkpoint; a restore refuses
      a checkpoint whose "model" entry differs.
    """

    def __init__(self, model: nnx.Module, objective: Callable, cfg, mesh, workdir: str, *,
                 trainable=nnx.Param, transform: Callable | None = None, extras: Any = None,
                 extras_shardings: Any = None, meta: dict | None = None, stage: str = "train",
                 log_dir: str | None = None):
        self.cfg, self.mesh, self.workdir, self.stage = cfg, mesh, workdir, stage
        self.log_dir = log_dir or workdir  # the run's metrics.jsonl and TensorBoard events go here
        self.objective, self.transform = objective, transform
        self.meta = dict(meta or {})
        layers.set_remat(model, cfg.get("remat", "none"))  # every trained model, HF-loaded ones included
        self.graphdef, params, frozen = nnx.split(model, trainable, ...)
        precision.check_trained(model, params, cfg.get("precision", "checkpoint"))  # set where it was built/loaded
        self.tx = make_optimizer(cfg)
        self.schedule = learning_rate_schedule(cfg.lr, cfg.steps, cfg.warmup_steps, cfg.schedule)
        data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
        if cfg.batch_size % (data_ways * cfg.micro_batches):
            raise UserInputError(
                f"train.batch_size={cfg.batch_size} must be divisible by data*fsdp={data_ways} "
                f"times train.micro_batches={cfg.micro_batches}"
            )
        self.param_shardings = shard_lib.state_shardings(params, mesh)
        self.frozen_shardings = shard_lib.state_shardings(frozen, mesh)
        self.frozen = jax.device_put(frozen, self.frozen_shardings)
        self.extras = extras
        self.extras_shardings = extras_shardings
        params = jax.device_put(params, self.param_shardings)
        replicated = shard_lib.replicated(mesh)
        # Moments follow their parameter's sharding; counters are replicated.
        opt_shardings = optax.tree_map_params(
            self.tx, lambda _, sh: sh, jax.eval_shape(self.tx.init, params), self.param_shardings,
            transform_non_params=lambda _: replicated,
        )
        opt_state = jax.jit(self.tx.init, out_shardings=opt_shardings)(params)
        self.state_shardings = {
            "params": self.param_shardings,
            "opt_state": opt_shardings,
            "step": shard_lib.replicated(mesh),
            "rng": shard_lib.replicated(mesh),
        }
        self.state = {
            "params": params,
            "opt_state": opt_state,
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(cfg.seed)),
        }
        self.state = jax.device_put(self.state, self.state_shardings)
        self.batch_sharding = shard_lib.batch_sharding(mesh)
        self.rows = batching.process_rows(mesh, cfg.batch_size)  # what this process loads of each batch
        self._step_fn = self._build_step()

    # ----------------------------------------------------------------- step
    def _build_step(self):
        graphdef, objective, transform, tx = self.graphdef, self.objective, self.transform, self.tx
        micro, mesh = self.cfg.micro_batches, self.mesh

        def loss_of(params, frozen, batch, rng):
            model = nnx.merge(graphdef, params, frozen)
            loss_sum, aux = objective(model, batch, rng)
            return loss_sum, aux

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)

        def step(state, batch, frozen, extras):
            with shard_lib.activation_mesh(mesh):
                return sharded_step(state, batch, frozen, extras)

        def sharded_step(state, batch, frozen, extras):
            rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
            aug_rng, loss_rng = jax.random.split(rng)
            if transform is not None:
                batch = transform(aug_rng, batch, jax.lax.stop_gradient(extras))
            params = state["params"]
            if micro == 1:
                (loss_sum, aux), grads = grad_fn(params, frozen, batch, loss_rng)
            else:
                def accumulate(carry, xs):
                    mb, r = xs
                    (l, a), g = grad_fn(params, frozen, mb, r)
                    return jax.tree.map(jnp.add, carry, (l, a, g)), None

                zeros = jax.tree.map(jnp.zeros_like, params)
                micro_batches = split_micro(batch, micro)
                first_micro = jax.tree.map(lambda v: v[0], micro_batches)
                aux_shape = jax.eval_shape(loss_of, params, frozen, first_micro, loss_rng)[1]
                init = (jnp.zeros((), jnp.float32), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape), zeros)
                rngs = jax.random.split(loss_rng, micro)
                (loss_sum, aux, grads), _ = jax.lax.scan(accumulate, init, (micro_batches, rngs))
            weight = jnp.maximum(aux["weight"], 1.0)
            # Back in the parameter's dtype: a float32 gradient of a bfloat16 weight would turn its AdamW
            # moments float32 after the first step (the state's dtypes must be a fixed point of the step).
            grads = jax.tree.map(lambda g, p: (g / weight).astype(p.dtype), grads, params)
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            new_state = {
                "params": optax.apply_updates(params, updates),
                "opt_state": opt_state,
                "step": state["step"] + 1,
                "rng": state["rng"],
            }
            metrics = {"loss": loss_sum / weight, "grad_norm": optax.tree.norm(grads), "weight": aux["weight"]}
            if "correct" in aux:
                metrics["accuracy"] = aux["correct"] / weight
            metrics["input_tokens"] = jnp.sum(batch["attention_mask"])
            return new_state, metrics

        batch_sh = self.batch_sharding
        return jax.jit(
            attention.right_padded_rows(step),  # the trainer's batches are right-padded
            in_shardings=(self.state_shardings, batch_sh, self.frozen_shardings, self.extras_shardings),
            out_shardings=(self.state_shardings, shard_lib.replicated(self.mesh)),
            donate_argnums=(0,),
        )

    # ----------------------------------------------------------------- io
    def global_batch(self, local: dict[str, np.ndarray], check_processes: bool = False) -> dict[str, jax.Array]:
        """Global [batch_size, ...] arrays from this process's rows; a wrong per-host batch is refused.

        check_processes (first step only, one small collective): every process
        must agree on the batch's keys and per-row shapes, or the global
        arrays would silently differ between hosts.
        """
        where = f"{self.stage} step batch"
        out = batching.global_batch(local, self.mesh, self.cfg.batch_size, self.rows, where)
        if check_processes and jax.process_count() > 1:
            shapes = sorted((k, v.shape, str(v.dtype)) for k, v in out.items())
            seen = multihost_utils.process_allgather(np.uint32(zlib.crc32(repr(shapes).encode())))
            if len(set(np.ravel(seen).tolist())) > 1:
                raise UserInputError(f"{where}: the processes disagree on the global batch on mesh "
                                     f"{dict(self.mesh.shape)}; process {jax.process_index()} has {shapes}")
        return out

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.state["params"], self.frozen)

    def _checkpoint_meta(self, step: int, metrics: dict) -> dict:
        """The metrics logged at `step` go along, so a run resumed at its last step still reports them."""
        return {**self.meta, "step": int(step), "data_position": int(step) * int(self.cfg.batch_size),
                "metrics": {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}}

    def restore(self, checkpointer: Checkpointer) -> int:
        found = checkpointer.restore_latest(abstract_like(self.state), self.meta)
        if found is None:
            return 0
        step, state, meta = found
        self.state = state
        self.resumed_metrics = meta.get("metrics") or {}
        log.info("%s: resumed from step %d in %s", self.stage, step, checkpointer.directory)
        return step

    # ----------------------------------------------------------------- loop
    def run(self, data: BatchSource, eval_fn: Callable | None = None) -> TrainResult:
        cfg = self.cfg
        checkpointer = Checkpointer(f"{self.workdir}/checkpoints", keep=cfg.keep_checkpoints)
        writer = MetricsWriter(self.log_dir, self.stage)
        start = self.restore(checkpointer)
        writer.forget_after(start)  # what a killed run logged past its checkpoint is logged again below
        self._saved_any = bool(checkpointer.steps())
        progress = Progress(cfg.steps, start, self.stage, cfg.log_every)
        last_metrics: dict = dict(self.resumed_metrics) if start else {}
        status = "done"
        pending: list = []  # (step, metrics on device) since the last log boundary
        self._t_prev = time.time()
        try:
            with _Preemption() as preempt, attention.mesh_context(self.mesh):
                step = start
                while step < cfg.steps:
                    batch = self.global_batch(data.batch(step, self.rows), check_processes=step == start)
                    before = _dtypes(self.state) if step == start else None
                    self.state, metrics = self._step_fn(self.state, batch, self.frozen, self.extras)
                    if before is not None:
                        self._check_no_drift(before)
                    step += 1
                    pending.append((step, metrics))
                    must_save = step % cfg.checkpoint_every == 0 or step == cfg.steps
                    evaluate = eval_fn is not None and (step % cfg.eval_every == 0 or step == cfg.steps)
                    boundary = must_save or evaluate or step % cfg.log_every == 0
                    stop = preempt.should_stop(step, boundary)
                    if boundary or stop:
                        last_metrics = self._log(pending, writer, progress)  # NaN check before any save
                        pending = []
                    if evaluate:
                        evals = {f"eval/{k}": v for k, v in eval_fn(self.model(), step).items()}
                        writer.write(step, evals)
                        last_metrics.update(evals)
                    if must_save or stop:
                        checkpointer.save(step, self.state, self._checkpoint_meta(step, last_metrics), force=True)
                        self._saved_any = True
                    if stop:
                        status = "preempted"
                        break
        finally:
            progress.close()
            writer.close()
            checkpointer.close()
        return TrainResult(self.model(), int(self.state["step"]), status, last_metrics)

    def _check_no_drift(self, before: list) -> None:
        """The first step must give back the state's dtypes: a drift would recompile the step, stop the
        donation of its buffers, and make a checkpoint that no fresh state can restore."""
        changed = [(path, a, b) for (path, a), (_, b) in zip(before, _dtypes(self.state)) if a != b]
        if changed:
            path, a, b = changed[0]
            raise StateDrift(f"{self.stage}: the train step turned state{path} from {a} into {b} "
                             f"({len(changed)} leaves changed dtype)")

    def _log(self, pending: list, writer: MetricsWriter, progress: Progress) -> dict:
        """Fetches the pending steps' metrics in one transfer; refuses a NaN/Inf loss at any of them."""
        fetched = jax.device_get([metrics for _, metrics in pending])
        for (step, _), metrics in zip(pending, fetched):
            if not math.isfinite(float(metrics["loss"])):
                kept = (f"the last good checkpoint in {self.workdir}/checkpoints is kept" if self._saved_any
                        else "no checkpoint had been saved yet")
                raise NonFiniteLoss(f"{self.stage}: loss is {float(metrics['loss'])} at step {step}; stopped, {kept}")
        step = pending[-1][0]
        values = {k: float(v) for k, v in fetched[-1].items()}
        now = time.time()
        tokens = sum(float(m["input_tokens"]) for m in fetched)
        values["tokens_per_s"] = tokens / max(now - self._t_prev, 1e-9)
        self._t_prev = now
        values["lr"] = float(self.schedule(step - 1))
        if step % self.cfg.log_every == 0 or step == self.cfg.steps:
            writer.write(step, values)
        progress.update(step, values)
        return values
