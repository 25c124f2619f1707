"""`python -m clue_jax.main` with gs:// served from a local directory (tests/workers/fake_gcs.py).

usage: fake_gcs_main.py ROOT -- ARGS for clue_jax.main
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fake_gcs  # noqa: E402

if __name__ == "__main__":
    assert sys.argv[2] == "--"
    fake_gcs.install(sys.argv[1])
    fake_gcs.guard_local_gs()
    sys.argv = ["clue_jax.main", *sys.argv[3:]]
    from clue_jax import main

    main.run()
