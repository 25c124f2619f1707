"""Test set-up: 8 fake CPU devices so sharding tests run anywhere.

XLA_FLAGS must be set before jax is first imported, hence at import time here.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gcs_root(tmp_path_factory):
    """gs:// served from one local directory (tests/workers/fake_gcs.py) for the whole test process: fsspec and
    epath cache the filesystem, so every test file that drives a bucket shares this root (each test its bucket)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "workers"))
    import fake_gcs

    root = tmp_path_factory.mktemp("gcs")
    fake_gcs.install(str(root))
    return root
