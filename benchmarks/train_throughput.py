"""Training throughput: clue_jax's jitted Trainer step vs PyTorch transformers' GPT-2 on the same CPU.

Both sides train the same GPT-2-style model (learned positions, LayerNorm,
GELU(tanh) MLP, biases, tied embeddings; float32 everywhere) on the same
random token batches with AdamW (same lr, betas, eps, weight decay on
matrices only) and global-norm clipping at 1.0, for the same number of
steps after warm-up.

Why one process, interleaved: the two frameworks run in this one process in
alternating rounds (clue_jax k steps, then PyTorch k steps, the order
swapped every round), so a change in machine load during the run hits both
sides alike; the per-step time of each side is the median over its rounds.
Neither side keeps threads busy while the other runs (XLA's thread pool
sleeps when idle; PyTorch's OpenMP threads do too, with OMP_WAIT_POLICY=PASSIVE,
set here unless the environment says otherwise). Process CPU seconds per step
are reported beside wall time: on a shared machine they show the work each
side does, which wall time alone hides.

clue_jax side: `Trainer._step_fn`, the jitted step `Trainer.run` uses (one
CPU device, mesh (1, 1, 1), donated state), fed by `Trainer.global_batch`
each step; rounds block only at their end, so no per-step host sync.
PyTorch side: eager `GPT2LMHeadModel` (SDPA attention, its default),
`torch.optim.AdamW`, `clip_grad_norm_`, with torch threads = core count.

MFU uses the PaLM formula, model FLOPs per token = 6 N + 12 L d T, against
the faster of a float32 jnp.dot and torch.mm (n x n) measured in this run.
N counts every parameter that enters a matmul: the tied token embedding once
(it is the LM head), not the position table (a lookup).

Matmul floor: each round also times the step's 99 matmuls one by one
(`MatmulFloor`); the sum of their best times is what a step would take if
nothing but matmuls cost time, and PyTorch's step over it (`ratio_ceiling`)
bounds what any JAX step on these dots could reach here. `--profile` splits
a traced clue_jax step into matmuls, other ops and dispatch
(`benchmarks/step_profile.py`).

    python benchmarks/train_throughput.py            # full size (minutes)
    python benchmarks/train_throughput.py --profile  # the same, plus the step's profile
    python benchmarks/train_throughput.py --smoke    # tiny, seconds (tests)
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU comparison, even on a machine with an accelerator
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# PyTorch's OpenMP threads otherwise spin after every op; on a busy machine a
# spinning thread waits for a descheduled peer and PyTorch's steps slow down
# several-fold (measured here: 4.8-7.2 s vs 4.2 s per step). Passive waiting
# gives the baseline its better setting. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The repository root, so `python benchmarks/train_throughput.py` finds clue_jax and benchmarks.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import common, step_profile  # noqa: E402
from clue_jax.models import config as model_config  # noqa: E402
from clue_jax.models.causal_lm import CausalLM  # noqa: E402
from clue_jax.train import defaults, objectives  # noqa: E402
from clue_jax.train.loop import Trainer  # noqa: E402
from clue_jax.parallel.mesh import make_mesh  # noqa: E402

NAME = "train_throughput"
TARGET_RATIO = 1.5
FLOOR_REPEATS = 3  # calls per matmul per round for the matmul floor (the fastest counts)

SIZES = {
    "full": dict(vocab=2048, d_model=256, layers=4, heads=4, mlp=1024, seq=128, batch=32,
                 steps=20, warmup=2, round_steps=2, peak_n=2048),
    "smoke": dict(vocab=64, d_model=32, layers=1, heads=2, mlp=64, seq=16, batch=4,
                  steps=2, warmup=1, round_steps=1, peak_n=128),
}
# The optimizer both sides use. A constant rate keeps the schedule out of the
# comparison (PyTorch's scheduler would be a host-side Python call).
OPT = dict(lr=1e-3, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01, clip_norm=1.0)


def make_batches(size: dict, count: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Random token ids, the same arrays for both sides (throughput does not depend on the text)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, size["vocab"], (size["batch"], size["seq"]), dtype=np.int32) for _ in range(count)]


def flops_per_token(matmul_params: int, size: dict) -> float:
    """PaLM's model FLOPs per trained token: 6 N + 12 L d T (forward + backward)."""
    return 6.0 * matmul_params + 12.0 * size["layers"] * size["d_model"] * size["seq"]


def step_matmuls(size: dict) -> list[tuple[int, tuple[int, int, int, int]]]:
    """(count, (batch, m, k, n)) for every forward matmul of one training step of the model.

    Per layer: the q, k, v and output projections, the MLP's two matmuls, and
    attention's q k^T and probs v (batched over sequences x heads); once: the
    tied LM head. Their forward + backward FLOPs are exactly the PaLM model
    FLOPs of the matmul weights (6 N_matrices + 12 L d T per token).
    """
    bt, d, f, v, layers = size["batch"] * size["seq"], size["d_model"], size["mlp"], size["vocab"], size["layers"]
    heads, t = size["heads"], size["seq"]
    head_dim = d // heads
    return [
        (4 * layers, (1, bt, d, d)),
        (layers, (1, bt, d, f)),
        (layers, (1, bt, f, d)),
        (1, (1, bt, d, v)),
        (layers, (size["batch"] * heads, t, head_dim, t)),
        (layers, (size["batch"] * heads, t, t, head_dim)),
    ]


class MatmulFloor:
    """Seconds one step spends in its matmuls alone, each timed in isolation with XLA's float32 dots.

    Every forward matmul C = A B needs two more in the backward pass (dA = dC
    B^T, dB = A^T dC). Each of the three is jitted and timed alone (the
    fastest of a few calls), so the sum is what the step would take if every
    other op (norms, GELU, softmax, the loss, layout copies, AdamW) were
    free. PyTorch's step time over this floor caps the ratio any JAX step
    built on these dots could reach on this machine. It is measured once per
    interleaved round (so it sees the machine load the two sides see), and
    each matmul counts at its best time over all rounds: the floor is the
    most favourable case for clue_jax.
    """

    def __init__(self, size: dict):
        import jax.numpy as jnp

        key = jax.random.key(0)
        self.gemms, self.flops = [], 0.0
        for count, (b, m, k, n) in step_matmuls(size):
            a = jax.random.normal(key, (b, m, k), jnp.float32)
            w = jax.random.normal(key, (b, k, n), jnp.float32)
            dc = jax.random.normal(key, (b, m, n), jnp.float32)
            self.gemms += [
                (count, jax.jit(jnp.matmul), (a, w)),  # forward
                (count, jax.jit(lambda g, w: jnp.matmul(g, w.swapaxes(-1, -2))), (dc, w)),  # input gradient
                (count, jax.jit(lambda a, g: jnp.matmul(a.swapaxes(-1, -2), g)), (a, dc)),  # weight gradient
            ]
            self.flops += count * 3 * 2.0 * b * m * k * n
        for _, fn, args in self.gemms:  # compile outside the timed rounds
            fn(*args).block_until_ready()
        self.best = [float("inf")] * len(self.gemms)

    def measure(self, repeats: int) -> float:
        """Times every matmul `repeats` times; returns this round's sum and keeps each matmul's best."""
        total = 0.0
        for i, (count, fn, args) in enumerate(self.gemms):
            best = min(common.time_calls(functools.partial(_run_blocking, fn, args), repeats, warmup=0))
            self.best[i] = min(self.best[i], best)
            total += count * best
        return total

    def seconds(self) -> float:
        """The floor: each matmul at its fastest over the whole run (the most favourable case)."""
        return sum(count * best for (count, _, _), best in zip(self.gemms, self.best, strict=True))


def _run_blocking(fn, args):
    return fn(*args).block_until_ready()


class ClueJaxSide:
    """The clue_jax Trainer's jitted step on one device (the default backend's first)."""

    name = "clue_jax"

    def __init__(self, size: dict, batches: list[np.ndarray], workdir: str, dtype: str = "float32"):
        # dtype: the compute dtype (parameters and optimizer state stay float32); bfloat16 on a GPU
        cfg = model_config.gpt2(vocab_size=size["vocab"], d_model=size["d_model"], num_layers=size["layers"],
                                num_heads=size["heads"], mlp_dim=size["mlp"], max_len=size["seq"], dtype=dtype)
        train_cfg = defaults.train_config(
            steps=1_000_000, batch_size=size["batch"], seq_len=size["seq"], lr=OPT["lr"], warmup_steps=0,
            schedule="constant", weight_decay=OPT["weight_decay"], clip_norm=OPT["clip_norm"],
            b1=OPT["b1"], b2=OPT["b2"],
        )
        model = CausalLM(cfg, rngs=nnx.Rngs(0))
        params = nnx.state(model, nnx.Param)
        self.n_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
        self.position_params = size["seq"] * size["d_model"]
        mesh = make_mesh((1, 1, 1), jax.devices()[:1])
        self.trainer = Trainer(model, objectives.causal_lm, train_cfg, mesh, workdir, meta={"model": cfg.to_dict()})
        self.batches = [{"input_ids": b, "attention_mask": np.ones_like(b)} for b in batches]
        self.steps_done = 0
        self.losses: list[float] = []
        self.last_cpu_s = 0.0

    def run(self, k: int) -> float:
        """Wall seconds for k steps; blocks only once, at the end. Also records CPU seconds."""
        tr = self.trainer
        state, metrics = tr.state, None
        c0 = time.process_time()
        t0 = time.perf_counter()
        for _ in range(k):
            batch = tr.global_batch(self.batches[self.steps_done % len(self.batches)])
            state, metrics = tr._step_fn(state, batch, tr.frozen, tr.extras)
            self.steps_done += 1
        jax.block_until_ready((state, metrics))
        seconds = time.perf_counter() - t0
        self.last_cpu_s = time.process_time() - c0
        tr.state = state
        self.losses.append(float(metrics["loss"]))
        return seconds

    def compiled_hlo(self) -> str:
        """The optimized HLO of the step, for naming the ops in a profile."""
        tr = self.trainer
        batch = tr.global_batch(self.batches[0])
        return tr._step_fn.lower(tr.state, batch, tr.frozen, tr.extras).compile().as_text()

    def compilations(self) -> int:
        """How many executables the step has; 1 means it was never recompiled."""
        return int(self.trainer._step_fn._cache_size())


class TorchSide:
    """transformers' GPT2LMHeadModel with torch.optim.AdamW, eager, float32."""

    name = "torch"

    def __init__(self, size: dict, batches: list[np.ndarray]):
        import torch
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel

        transformers.logging.set_verbosity_error()
        torch.manual_seed(0)
        self.torch = torch
        cfg = GPT2Config(
            vocab_size=size["vocab"], n_positions=size["seq"], n_embd=size["d_model"], n_layer=size["layers"],
            n_head=size["heads"], n_inner=size["mlp"], activation_function="gelu_new", layer_norm_epsilon=1e-5,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
            bos_token_id=0, eos_token_id=0,
        )
        self.model = GPT2LMHeadModel(cfg)
        self.model.train()
        self.attn_implementation = self.model.config._attn_implementation
        params = list(self.model.parameters())  # tied weights appear once
        self.n_params = int(sum(p.numel() for p in params))
        # Weight decay on matrices only, as clue_jax's optimizer does.
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": OPT["weight_decay"]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.params = params
        self.opt = torch.optim.AdamW(groups, lr=OPT["lr"], betas=(OPT["b1"], OPT["b2"]), eps=OPT["eps"])
        self.batches = [torch.from_numpy(b).long() for b in batches]
        self.mask = torch.ones_like(self.batches[0])
        self.steps_done = 0
        self.losses: list[float] = []
        self.last_cpu_s = 0.0

    def run(self, k: int) -> float:
        torch = self.torch
        loss = None
        c0 = time.process_time()
        t0 = time.perf_counter()
        for _ in range(k):
            ids = self.batches[self.steps_done % len(self.batches)]
            loss = self.model(input_ids=ids, attention_mask=self.mask, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, OPT["clip_norm"])
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.steps_done += 1
        seconds = time.perf_counter() - t0
        self.last_cpu_s = time.process_time() - c0
        self.losses.append(float(loss.detach()))
        return seconds


def _round_seconds(k: int, times: dict[str, list[float]], floors: list[float]) -> float:
    """Expected wall time of the next round: k steps per side plus one matmul-floor measurement."""
    return k * sum(statistics.median(t) for t in times.values()) + FLOOR_REPEATS * statistics.median(floors)


def run_benchmark(size: dict, steps: int, warmup: int, round_steps: int, peak_n: int, max_seconds: float,
                  profile: bool = False) -> dict:
    import torch

    threads = common.cpu_count()
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    load_before = common.load_average()
    tokens_per_step = size["batch"] * size["seq"]
    batches = make_batches(size)

    peak_jax = common.jax_matmul_flops(peak_n)
    peak_torch = common.torch_matmul_flops(peak_n)
    peak = max(peak_jax, peak_torch)

    with tempfile.TemporaryDirectory() as workdir:
        cj = ClueJaxSide(size, batches, workdir)
        first_step_s = cj.run(1)  # trace + compile + one step
        pt = TorchSide(size, batches)
        floor = MatmulFloor(size)
        if warmup > 1:
            cj.run(warmup - 1)
        pt.run(warmup)

        times: dict[str, list[float]] = {"clue_jax": [], "torch": []}
        cpu: dict[str, list[float]] = {"clue_jax": [], "torch": []}
        floors: list[float] = []
        done, r, stopped_early = 0, 0, False
        while done < steps:
            k = min(round_steps, steps - done)
            # A busy machine must not push the run past its time budget: stop
            # before a round that would overrun (both sides keep equal steps).
            if r >= 2 and time.perf_counter() - t_start + _round_seconds(k, times, floors) > max_seconds:
                stopped_early = True
                break
            order = (cj, pt) if r % 2 == 0 else (pt, cj)
            for side in order:
                times[side.name].append(side.run(k) / k)
                cpu[side.name].append(side.last_cpu_s / k)
            floors.append(floor.measure(FLOOR_REPEATS))
            done += k
            r += 1
        compilations = cj.compilations()
        clue_jax_losses = list(cj.losses)  # the profiled steps below are not timed rounds
        step_breakdown = step_profile.profile_step(cj.run, cj.compiled_hlo(), steps=2) if profile else None

    step_s = {name: statistics.median(ts) for name, ts in times.items()}
    cpu_s = {name: statistics.median(cs) for name, cs in cpu.items()}
    floor_s = floor.seconds()
    tps = {name: tokens_per_step / s for name, s in step_s.items()}
    if cj.n_params != pt.n_params:
        print(f"warning: parameter counts differ: clue_jax {cj.n_params}, torch {pt.n_params}", file=sys.stderr)
    fpt = flops_per_token(cj.n_params - cj.position_params, size)
    ratio = tps["clue_jax"] / tps["torch"]
    return {
        "benchmark": NAME,
        "clue_jax_tokens_per_s": tps["clue_jax"],
        "torch_tokens_per_s": tps["torch"],
        "ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": bool(ratio >= TARGET_RATIO),
        "compile_s": max(first_step_s - step_s["clue_jax"], 0.0),
        "first_step_s": first_step_s,
        "clue_jax_step_s": step_s["clue_jax"],
        "torch_step_s": step_s["torch"],
        "clue_jax_step_s_all": times["clue_jax"],
        "torch_step_s_all": times["torch"],
        "clue_jax_cpu_s_per_step": cpu_s["clue_jax"],
        "torch_cpu_s_per_step": cpu_s["torch"],
        "cpu_time_ratio": cpu_s["torch"] / cpu_s["clue_jax"],
        "matmul_floor_s": floor_s,
        "matmul_floor_s_per_round": floors,
        "matmul_floor_flops": floor.flops,
        "matmul_share_of_clue_jax_step": floor_s / step_s["clue_jax"],
        "ratio_ceiling": step_s["torch"] / floor_s,
        "clue_jax_step_profile": step_breakdown,
        "clue_jax_mfu": tps["clue_jax"] * fpt / peak,
        "torch_mfu": tps["torch"] * fpt / peak,
        "peak_flops": peak,
        "peak_flops_jax": peak_jax,
        "peak_flops_torch": peak_torch,
        "peak_matmul_n": peak_n,
        "flops_per_token": fpt,
        "n_params": cj.n_params,
        "torch_n_params": pt.n_params,
        "clue_jax_step_compilations": compilations,
        "clue_jax_losses": clue_jax_losses,
        "torch_losses": pt.losses,
        "timed_steps": done,
        "requested_steps": steps,
        "stopped_early": stopped_early,
        "max_seconds": max_seconds,
        "warmup_steps": warmup,
        "steps_per_round": round_steps,
        "tokens_per_step": tokens_per_step,
        "model": {k: size[k] for k in ("vocab", "d_model", "layers", "heads", "mlp", "seq", "batch")},
        "optimizer": dict(OPT),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "torch_attn_implementation": pt.attn_implementation,
        "versions": {"jax": jax.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_device": str(jax.devices()[0]),
        "machine": common.machine_info(),
        "load_average_before": load_before,
        "wall_s": time.perf_counter() - t_start,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and 2 steps: checks the script runs")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per side (clue_jax's first compiles)")
    parser.add_argument("--round-steps", type=int, default=None, help="steps per side per interleaved round")
    parser.add_argument("--max-seconds", type=float, default=240.0,
                        help="stop timing rounds early rather than run past this wall time (busy machines)")
    parser.add_argument("--profile", action="store_true",
                        help="also trace two clue_jax steps and split their wall time: matmuls, other ops, rest")
    parser.add_argument("--results-dir", default=None, help="where <name>.json goes (default benchmarks/results)")
    args = parser.parse_args(argv)
    size = SIZES["smoke" if args.smoke else "full"]
    steps = args.steps or size["steps"]
    warmup = args.warmup or size["warmup"]
    round_steps = args.round_steps or size["round_steps"]
    result = run_benchmark(size, steps, warmup, round_steps, size["peak_n"], args.max_seconds, args.profile)
    result["smoke"] = bool(args.smoke)
    print(
        f"clue_jax {result['clue_jax_tokens_per_s']:.0f} tok/s, torch {result['torch_tokens_per_s']:.0f} tok/s, "
        f"ratio {result['ratio']:.2f} (target {TARGET_RATIO}), compile {result['compile_s']:.1f} s, "
        f"MFU clue_jax {result['clue_jax_mfu']:.1%} torch {result['torch_mfu']:.1%} "
        f"of {result['peak_flops'] / 1e9:.1f} GFLOP/s; CPU s/step clue_jax {result['clue_jax_cpu_s_per_step']:.2f} "
        f"torch {result['torch_cpu_s_per_step']:.2f}; matmuls alone {result['matmul_floor_s']:.2f} s/step, "
        f"so ratio <= {result['ratio_ceiling']:.2f}; {result['timed_steps']} timed steps, "
        f"load {result['load_average_before']} -> {result['machine']['load_average']}",
        flush=True,
    )
    if result["clue_jax_step_profile"]:
        prof = result["clue_jax_step_profile"]
        print(f"clue_jax step profiled: {prof['window_s']:.2f} s = matmuls {prof['matmul_s']:.2f} s + other ops "
              f"{prof['other_s']:.2f} s + neither {prof['rest_s']:.2f} s", flush=True)
    common.write_result(NAME + ("_smoke" if args.smoke else ""), result, args.results_dir)
    return result


if __name__ == "__main__":
    main()
