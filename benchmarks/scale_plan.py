"""Scale plan: per-device memory and FLOPs of the LLaMA-3 pod steps, by AOT compilation on fake CPU devices.

Nothing is allocated: models are built with `nnx.eval_shape`, every input is a
`jax.ShapeDtypeStruct` carrying the sharding the project would give it
(`clue_jax.parallel.rules` rules on configs/llama3_pod.py's mesh, (1, 8, -1)
over 64 devices), and each step is `jit(...).lower(...).compile()`d; the
bytes come from `memory_analysis()` of the compiled per-device program; the
FLOPs per step are counted analytically (benchmarks/model_flops.py: XLA's
`cost_analysis()` counts the scanned layers' loop body once; its number is
kept beside as xla_flops_per_step).

Cases (configs/llama3_pod.py: its models, `cpt` training settings with
remat, LoRA rank 16, score_batch and query_block):
- llama3_8b_lora16_train: the Trainer's own jitted step (`Trainer._build_step`,
  the one `Trainer.run` calls) for the 8B student with LoRA rank 16 (adapters
  and their AdamW moments float32, the base bf16 and frozen);
- llama3_8b_full_train: the same step training every parameter (bf16 master
  weights and moments, as the Trainer keeps them today);
- llama3_8b_lora16_live_train: the LoRA step in live mode, the teachers and
  the student in one program: the 70B and 8B teachers score each batch inside
  the step (`pipelines.knowledge.live_transform`, clue dropout "contrast") and
  the student trains on the dropped batch;
- llama3_70b_8b_scoring: both teachers' received-attention scoring
  (`clues.scoring.received_attention`, the blocked path) in one program.

Every case also lists the collectives of its compiled per-device program
(`clue_jax.parallel.collectives`: op, dtype, per-device shape, bytes), with
the largest all-reduce and all-gather first: weights all-gathered and
activations left split is what FSDP should show.

What a CPU compile can tell: the bytes of the arguments (weights, optimizer
state, batch) and outputs each device holds, which are exact for this
sharding, and the FLOPs. What it cannot: the temporaries are the CPU
compiler's buffer assignment and fusion, an estimate of what XLA:TPU or
XLA:GPU would need (their fusions, layouts and the fused attention kernels
differ), and nothing about speed.

    python benchmarks/scale_plan.py              # the full models (see README for the time it takes)
    python benchmarks/scale_plan.py --layers 2   # the same widths with 2 layers per model (quick)
    python benchmarks/scale_plan.py --devices 8  # the same on 8 devices (8 x H100): mesh (1, 8, 1)
    python benchmarks/scale_plan.py --smoke      # tiny shapes on 8 devices (tests/test_scale_plan_smoke.py)
    python benchmarks/scale_plan.py --devices 8 --layers 2 --seq-len 8192 --cases lora   # one case, long rows

Last stdout line: {"cases": [{"name", "devices", "mesh", "argument_bytes_per_device",
"output_bytes_per_device", "temp_bytes_per_device", "flops_per_step", "largest_collectives", "collectives",
...}]}; also written to benchmarks/results/scale_plan[_smoke | _<L>layers][_<N>devices][_T<seq>].json.
"""
from __future__ import annotations

import argparse
import os
import sys



def _devices_from_argv(argv) -> int:
    """--devices N (default 64; 8 with --smoke): read before jax is imported, which fixes the count."""
    for i, arg in enumerate(argv):
        if arg == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--devices="):
            return int(arg.split("=", 1)[1])
    return 8 if "--smoke" in argv else 64


_DEVICES = _devices_from_argv(sys.argv)
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    + [f"--xla_force_host_platform_device_count={_DEVICES}"])
os.environ["JAX_PLATFORMS"] = "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import model_flops  # noqa: E402
from clue_jax.clues import scoring  # noqa: E402
from clue_jax.clues.dropout import DropoutConfig  # noqa: E402
from clue_jax.models import layers, lora  # noqa: E402
from clue_jax.models.causal_lm import CausalLM  # noqa: E402
from clue_jax.models.config import ModelConfig  # noqa: E402
from clue_jax.parallel import collectives as collectives_lib, mesh as mesh_lib, rules as shard_lib  # noqa: E402
from clue_jax.pipelines.continual import live_transform  # noqa: E402
from clue_jax.train import loop, objectives  # noqa: E402
from clue_jax.train.optim import make_optimizer  # noqa: E402


def pod_config(variant: str):
    spec = importlib.util.spec_from_file_location("llama3_pod", os.path.join(ROOT, "configs", "llama3_pod.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.get_config(variant)


def _abstract_inputs(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _batch(mesh, batch: int, seq: int) -> dict:
    sds = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=shard_lib.batch_sharding(mesh))
    return {"input_ids": sds, "attention_mask": sds}


def _collectives(compiled) -> dict:
    """The largest all-reduce and all-gather, and every collective (same op, dtype and shape counted once)."""
    found = collectives_lib.collectives(compiled.as_text())
    counted: dict = {}
    for c in found:
        key = (c["op"], c["dtype"], tuple(c["shape"]))
        counted.setdefault(key, dict(c, count=0))["count"] += 1
    ordered = sorted(counted.values(), key=lambda c: (-c["bytes"], c["op"]))
    return {"largest_collectives": collectives_lib.largest(found), "collectives": ordered}


def _report(name: str, compiled, mesh, seconds: float, flops_per_step: float, **extra) -> dict:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops_device = float(cost.get("flops", 0.0))
    return {"name": name, "devices": mesh.size, "mesh": dict(mesh.shape),
            "argument_bytes_per_device": int(mem.argument_size_in_bytes),
            "output_bytes_per_device": int(mem.output_size_in_bytes),
            "temp_bytes_per_device": int(mem.temp_size_in_bytes),
            "alias_bytes_per_device": int(mem.alias_size_in_bytes),  # donated state: outputs reuse these
            "flops_per_step": flops_per_step,  # analytic (model_flops): XLA counts a scanned layer once
            "xla_flops_per_step": flops_device * mesh.size,
            "compile_s": round(seconds, 1), **_collectives(compiled), **extra}


def _abstract_model(cfg: ModelConfig):
    return nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))


def train_case(name: str, cfg: ModelConfig, train_cfg, mesh, *, lora_cfg=None, teachers=None, clues=None) -> dict:
    """The Trainer's jitted step, lowered on abstract state (the Trainer itself would allocate it).

    teachers: {"large", "small"} ModelConfigs scored inside the step (live mode), with `clues` the config's
    clues section (query_block, teacher_dtype)."""
    def build():
        model = CausalLM(cfg, rngs=nnx.Rngs(0))
        if lora_cfg is not None:
            lora.apply_lora(model, lora_cfg.rank, lora_cfg.alpha, tuple(lora_cfg.targets), rngs=nnx.Rngs(0))
        return model

    model = layers.set_remat(nnx.eval_shape(build), train_cfg.remat)
    trainer = object.__new__(loop.Trainer)  # the same step as Trainer.run, without placing real arrays
    trainer.graphdef, params, frozen = nnx.split(model, lora.trainable_filter(lora_cfg is not None), ...)
    trainer.cfg, trainer.mesh, trainer.objective, trainer.transform = train_cfg, mesh, objectives.causal_lm, None
    extras = None
    if teachers is not None:
        dtype = clues.teacher_dtype  # built abstractly in it: what scoring.in_dtype gives the loaded teachers
        built = {k: _abstract_model(dataclasses.replace(c, dtype=dtype, param_dtype=dtype) if dtype else c)
                 for k, c in teachers.items()}
        trainer.transform, extras = live_transform(built, DropoutConfig(method="contrast"), clues.query_block)
    trainer.tx = make_optimizer(train_cfg)
    param_sh = shard_lib.state_shardings(params, mesh)
    opt_abstract = jax.eval_shape(trainer.tx.init, params)
    replicated = shard_lib.replicated(mesh)
    opt_sh = optax.tree_map_params(trainer.tx, lambda _, sh: sh, opt_abstract, param_sh,
                                   transform_non_params=lambda _: replicated)
    trainer.state_shardings = {"params": param_sh, "opt_state": opt_sh, "step": replicated, "rng": replicated}
    trainer.frozen_shardings = shard_lib.state_shardings(frozen, mesh)
    trainer.extras_shardings = None if extras is None else shard_lib.state_shardings(extras, mesh)
    trainer.batch_sharding = shard_lib.batch_sharding(mesh)
    key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    state = {"params": params, "opt_state": opt_abstract, "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": key}
    state = _abstract_inputs(state, trainer.state_shardings)
    t0 = time.perf_counter()
    compiled = trainer._build_step().lower(state, _batch(mesh, train_cfg.batch_size, train_cfg.seq_len),
                                           _abstract_inputs(frozen, trainer.frozen_shardings),
                                           None if extras is None else _abstract_inputs(extras, trainer.extras_shardings),
                                           ).compile()
    n_trainable = sum(x.size for x in jax.tree.leaves(params))
    flops = model_flops.train_step_flops(cfg, train_cfg.batch_size, train_cfg.seq_len,
                                         frozen_base=lora_cfg is not None, remat=train_cfg.remat)
    flops += sum(model_flops.scoring_flops(c, train_cfg.batch_size, train_cfg.seq_len)
                 for c in (teachers or {}).values())
    return _report(name, compiled, mesh, time.perf_counter() - t0, flops, trainable_params=int(n_trainable),
                   layers=cfg.num_layers, batch=train_cfg.batch_size, seq_len=train_cfg.seq_len, remat=train_cfg.remat)


def scoring_case(name: str, cfgs: list[ModelConfig], mesh, *, batch: int, seq: int, query_block: int) -> dict:
    """Every teacher's received attention for one batch, in one program (as live scoring runs them)."""
    parts = []
    for cfg in cfgs:
        graphdef, params, rest = nnx.split(_abstract_model(cfg), nnx.Param, ...)
        parts.append((graphdef, shard_lib.state_shardings(params, mesh), shard_lib.state_shardings(rest, mesh),
                      params, rest))

    def score(states, ids, mask):
        with shard_lib.activation_mesh(mesh):  # as scoring.make_scorer traces it
            return [scoring.received_attention(nnx.merge(g, p, r), ids, mask, query_block)
                    for (g, *_), (p, r) in zip(parts, states)]

    batch_sh = shard_lib.batch_sharding(mesh)
    states = [(_abstract_inputs(p, psh), _abstract_inputs(r, rsh)) for _, psh, rsh, p, r in parts]
    inputs = _batch(mesh, batch, seq)
    t0 = time.perf_counter()
    compiled = jax.jit(score, out_shardings=[batch_sh] * len(cfgs)).lower(
        states, inputs["input_ids"], inputs["attention_mask"]).compile()
    flops = sum(model_flops.scoring_flops(c, batch, seq) for c in cfgs)
    return _report(name, compiled, mesh, time.perf_counter() - t0, flops, layers=[c.num_layers for c in cfgs],
                   batch=batch, seq_len=seq, query_block=query_block)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on 8 devices")
    parser.add_argument("--devices", type=int, default=_DEVICES, help="fake CPU devices (64; 8 for 8 x H100)")
    parser.add_argument("--layers", type=int, default=0, help="layers per model (0: the published depth)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--remat", default="full", help="train.remat of the train cases (none | full | dots)")
    parser.add_argument("--cases", nargs="*", default=["lora", "full", "live", "scoring"],
                        choices=["lora", "full", "live", "scoring"])
    parser.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)

    module, c = pod_config("tiny" if args.smoke else "")
    models = module.TINY_MODELS if args.smoke else module.MODELS
    seq = 64 if args.smoke else args.seq_len
    cfgs = {}
    for size, values in models.items():
        cfg = ModelConfig.from_dict(dict(values, max_len=max(values.get("max_len", 256), seq)))
        cfgs[size] = dataclasses.replace(cfg, num_layers=args.layers) if args.layers else cfg
    mesh = mesh_lib.make_mesh((1, 8, -1) if args.smoke else tuple(c.mesh.shape))
    train_cfg = c.cpt.copy_and_resolve_references()
    train_cfg.update(seq_len=seq, remat=args.remat)
    lora_cfg = c.lora.copy_and_resolve_references()
    lora_cfg.rank = 16
    cases = []
    start = time.perf_counter()
    if "lora" in args.cases:
        cases.append(train_case("llama3_8b_lora16_train", cfgs["small"], train_cfg, mesh, lora_cfg=lora_cfg))
        print(json.dumps(cases[-1]), file=sys.stderr, flush=True)
    if "full" in args.cases:
        cases.append(train_case("llama3_8b_full_train", cfgs["small"], train_cfg, mesh))
        print(json.dumps(cases[-1]), file=sys.stderr, flush=True)
    if "live" in args.cases:
        cases.append(train_case("llama3_8b_lora16_live_train", cfgs["small"], train_cfg, mesh, lora_cfg=lora_cfg,
                                teachers={"large": cfgs["large"], "small": cfgs["small"]}, clues=c.clues))
        print(json.dumps(cases[-1]), file=sys.stderr, flush=True)
    if "scoring" in args.cases:
        cases.append(scoring_case("llama3_70b_8b_scoring", [cfgs["large"], cfgs["small"]], mesh,
                                  batch=c.clues.score_batch, seq=seq, query_block=c.clues.query_block))
        print(json.dumps(cases[-1]), file=sys.stderr, flush=True)
    result = {"cases": cases, "smoke": args.smoke, "layers_override": args.layers,
              "jax": jax.__version__, "wall_s": round(time.perf_counter() - start, 1)}
    os.makedirs(args.results_dir, exist_ok=True)
    suffix = "_smoke" if args.smoke else (f"_{args.layers}layers" if args.layers else "")
    suffix += f"_{args.devices}devices" if args.devices != 64 and not args.smoke else ""
    suffix += f"_T{seq}" if seq != 2048 and not args.smoke else ""
    with open(os.path.join(args.results_dir, f"scale_plan{suffix}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
