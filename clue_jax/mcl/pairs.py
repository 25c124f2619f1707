"""An ElectraPair's weights on disk: created straight onto the mesh, saved and restored with orbax (kept in
memory too, so a stage that reads what this process wrote skips the restore)."""
from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from clue_jax import workdir_fs
from clue_jax.errors import UserInputError
from clue_jax.mcl import downstream
from clue_jax.models.encoder import ElectraPair, EncoderConfig
from clue_jax.parallel import rules as shard_lib
from clue_jax.train.checkpoint import refuse_per_layer_layout, saved_tree

_INITS: dict = {}
_PAIRS: dict[str, ElectraPair] = {}  # model_dir -> pair, so a stage that reads what this process wrote skips orbax


def create_pair(disc_cfg, gen_cfg, seed: int, mesh) -> ElectraPair:
    """Initialised under jit straight onto the mesh; the seed is traced, so every seed reuses one compile."""
    key = (disc_cfg, gen_cfg, id(mesh))
    if key not in _INITS:
        build = lambda s: ElectraPair(disc_cfg, gen_cfg, nnx.Rngs(jax.random.key(s)))
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(0)))
        init = jax.jit(lambda s: nnx.split(build(s))[1], out_shardings=shard_lib.state_shardings(abstract, mesh))
        _INITS[key] = (graphdef, init)
    graphdef, init = _INITS[key]
    return nnx.merge(graphdef, init(jax.numpy.asarray(seed, jax.numpy.uint32)))


def save_pair(pair: ElectraPair, directory: str) -> None:
    directory = workdir_fs.join(directory)
    params = nnx.state(pair, nnx.Param)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(directory, "params"), params, force=True)
    if jax.process_index() == 0:
        with workdir_fs.open_write(os.path.join(directory, "pair_config.json")) as f:
            json.dump({"discriminator": pair.disc_cfg.to_dict(), "generator": pair.gen_cfg.to_dict()}, f, indent=1)
    # A copy: a Trainer's model (e.g. at a snapshot) has its buffers donated by the next step.
    graphdef, _, rest = nnx.split(pair, nnx.Param, ...)
    _PAIRS[directory] = nnx.merge(graphdef, downstream.copy_state(params), rest)


def load_pair(directory: str, mesh) -> ElectraPair:
    """An ElectraPair saved by `save_pair`, placed on `mesh` (from memory when this process saved it)."""
    directory = workdir_fs.join(directory)
    if directory in _PAIRS:
        return _PAIRS[directory]
    path = os.path.join(directory, "pair_config.json")
    try:
        cfgs = json.loads(workdir_fs.read_text(path))
        disc = EncoderConfig.from_dict(cfgs["discriminator"], where=path)
        gen = EncoderConfig.from_dict(cfgs["generator"], where=path)
    except (OSError, KeyError, json.JSONDecodeError) as err:
        raise UserInputError(f"cannot read {path}: {' '.join(str(err).split())}") from None
    graphdef, params = nnx.split(nnx.eval_shape(lambda: ElectraPair(disc, gen, nnx.Rngs(0))), nnx.Param)
    shardings = shard_lib.state_shardings(params, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings)
    refuse_per_layer_layout(saved_tree(os.path.join(directory, "params")), f"model {directory}/params")
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(os.path.join(directory, "params"), target)
    _PAIRS[directory] = nnx.merge(graphdef, restored)
    return _PAIRS[directory]


def params_hash(state) -> str:
    digest = hashlib.sha256()
    for path, leaf in sorted(nnx.to_flat_state(state), key=lambda kv: str(kv[0])):
        digest.update(str(path).encode())
        digest.update(np.ascontiguousarray(jax.device_get(leaf.get_value() if hasattr(leaf, "get_value") else leaf))
                      .tobytes())
    return digest.hexdigest()[:12]
