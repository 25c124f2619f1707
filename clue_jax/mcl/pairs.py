"""An ElectraPair's weights on disk through the model store (clue_jax.models.store: checksummed, restored
sharded; kept in memory too, so a stage that reads what this process wrote skips the restore)."""
from __future__ import annotations

import functools
import hashlib
import json
import os

import jax
import numpy as np
from flax import nnx

from clue_jax import workdir_fs
from clue_jax.errors import UserInputError
from clue_jax.mcl import downstream
from clue_jax.models import store
from clue_jax.models.encoder import ElectraPair, EncoderConfig
from clue_jax.parallel import rules as shard_lib

_PAIRS: dict[str, ElectraPair] = {}  # model_dir -> pair, so a stage that reads what this process wrote skips orbax


def create_pair(disc_cfg, gen_cfg, seed: int, mesh) -> ElectraPair:
    """Initialised under jit straight onto the mesh; the seed is traced, so every seed reuses one compile."""
    return store.create(lambda s: ElectraPair(disc_cfg, gen_cfg, nnx.Rngs(jax.random.key(s))), seed,
                        functools.partial(shard_lib.state_shardings, mesh=mesh), (disc_cfg, gen_cfg, mesh))


def save_pair(pair: ElectraPair, directory: str) -> None:
    directory = workdir_fs.join(directory)
    params = nnx.state(pair, nnx.Param)
    store.save(pair, directory, {"pair_config.json": {"discriminator": pair.disc_cfg.to_dict(),
                                                      "generator": pair.gen_cfg.to_dict()}})
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
    _PAIRS[directory] = nnx.merge(graphdef, store.restore(directory, target))
    return _PAIRS[directory]


def params_hash(state) -> str:
    digest = hashlib.sha256()
    for path, leaf in sorted(nnx.to_flat_state(state), key=lambda kv: str(kv[0])):
        digest.update(str(path).encode())
        digest.update(np.ascontiguousarray(jax.device_get(leaf.get_value() if hasattr(leaf, "get_value") else leaf))
                      .tobytes())
    return digest.hexdigest()[:12]
