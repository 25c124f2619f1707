"""The clue_bios tfds builder: prepared as array_record without TensorFlow, same records."""

import pytest
import tensorflow_datasets as tfds

from clue_jax.data import bios, tfds_bios
from clue_jax.errors import UserInputError


def test_builder_yields_world_records(tmp_path):
    builder = tfds.builder("clue_bios", config="tiny", data_dir=str(tmp_path))
    builder.download_and_prepare(file_format="array_record")
    assert set(builder.info.splits) == {"background", "new"}
    assert set(builder.info.features) == set(tfds_bios.FIELDS)
    world = bios.build_world(tfds_bios.BUILDER_CONFIGS[1].world)
    for split in ("background", "new"):
        records = tfds_bios.load_bios_records("tiny", tmp_path, split)
        assert records == bios.world_records(world, split)
    source = builder.as_data_source("new")
    assert len(source) == 10 and source[0]["name"] == world.new[0].name.encode()


def test_custom_world_config(tmp_path):
    config = tfds_bios.bios_builder_config(seed=7, num_background=6, num_new=3)
    assert config.name == tfds_bios.bios_builder_config(seed=7, num_background=6, num_new=3).name
    assert config.name != tfds_bios.bios_builder_config(seed=8, num_background=6, num_new=3).name
    records = tfds_bios.load_bios_records(config, tmp_path, "new")
    assert records == bios.world_records(bios.build_world(config.world), "new")
    assert [r["name"] for r in records] != [
        r["name"] for r in tfds_bios.load_bios_records("tiny", tmp_path, "new")[:3]]


def test_bad_config_or_split(tmp_path):
    with pytest.raises(UserInputError, match="config 'huge' not found"):
        tfds_bios.load_bios_records("huge", tmp_path, "new")
    with pytest.raises(UserInputError, match="unknown clue_bios split"):
        tfds_bios.load_bios_records("tiny", tmp_path, "train")
