"""The biography world as a tensorflow-datasets builder named `clue_bios`.

Why tfds: users get the world through the same builder / data-source API as any
other corpus (versioned, cached on disk, split-able per host). TensorFlow is not
needed: the builder is prepared with `file_format="array_record"` and read with
`builder.as_data_source(split)` (random access, no tf.data).

Usage:
    import clue_jax.data.tfds_bios  # registers "clue_bios"
    b = tfds.builder("clue_bios", config="tiny", data_dir=d)
    b.download_and_prepare(file_format="array_record")
    rows = b.as_data_source("new")

Records keep the world order (shuffling is disabled), so row i of split s is
`world_records(build_world(config.world), s)[i]`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import tensorflow_datasets as tfds
from etils import epath

from clue_jax.data.bios import ATTRIBUTES, WorldConfig, build_world, world_records
from clue_jax.data.corpus import read_data_source
from clue_jax.errors import UserInputError

FIELDS = ("name", "gender", *ATTRIBUTES, "bio", "bio_rich", "split")
SPLITS = ("background", "new")


@dataclasses.dataclass(eq=False)
class ClueBiosConfig(tfds.core.BuilderConfig):
    """A named world. The tfds cache is keyed by config name, so one name = one world."""

    world: WorldConfig = WorldConfig()


BUILDER_CONFIGS = (
    ClueBiosConfig(name="default", description="400 background + 100 new people.",
                   world=WorldConfig()),
    ClueBiosConfig(name="tiny", description="40 background + 10 new people (tests).",
                   world=WorldConfig(num_background=40, num_new=10)),
    ClueBiosConfig(name="large", description="10000 background + 1000 new people.",
                   world=WorldConfig(num_background=10_000, num_new=1_000)),
)


def bios_builder_config(name: str | None = None, **world_kwargs) -> ClueBiosConfig:
    """A config for a custom world, e.g. `bios_builder_config(seed=3, num_new=50)`.

    Without `name` the name is derived from the WorldConfig fields, so two different
    worlds never share a cache directory.
    """
    world = WorldConfig(**world_kwargs)
    if name is None:
        digest = hashlib.sha1(json.dumps(dataclasses.asdict(world), sort_keys=True).encode())
        name = f"custom_{digest.hexdigest()[:10]}"
    return ClueBiosConfig(name=name, description=f"custom world {world}", world=world)


class ClueBios(tfds.core.GeneratorBasedBuilder):
    """Synthetic bioS-style biographies: splits "background" and "new", all fields text."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = list(BUILDER_CONFIGS)
    DEFAULT_CONFIG_NAME = "default"
    # tfds 4.9.10 looks up `importlib_resources` (not installed on Python >= 3.9) while
    # locating checksums from the code path (tensorflow/datasets#11212); this builder
    # downloads nothing, so give it its own file as code path and skip that lookup.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Deterministic synthetic biographies (Allen-Zhu & Li bioS style).",
            features=tfds.features.FeaturesDict({f: tfds.features.Text() for f in FIELDS}),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the world is generated
        world = build_world(self.builder_config.world)
        return {split: self._generate_examples(world, split) for split in SPLITS}

    def _generate_examples(self, world, split):
        for i, record in enumerate(world_records(world, split)):
            yield i, record


def _decode(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_bios_records(config_name: str | ClueBiosConfig, data_dir: str | os.PathLike,
                      split: str) -> list[dict[str, str]]:
    """Prepares (once, cached in data_dir) and reads one split as a list of str dicts."""
    if split not in SPLITS:
        raise UserInputError(f"unknown clue_bios split {split!r}; expected one of {SPLITS}")
    try:
        builder = tfds.builder("clue_bios", config=config_name, data_dir=os.fspath(data_dir))
    except ValueError as e:  # unknown config name
        names = [c.name for c in BUILDER_CONFIGS]
        raise UserInputError(f"clue_bios config {config_name!r} not found; built-in configs: "
                             f"{names} (or pass bios_builder_config(...))") from e
    builder.download_and_prepare(file_format="array_record")
    rows = read_data_source(builder.as_data_source(split))
    return [{k: _decode(v) for k, v in row.items()} for row in rows]
