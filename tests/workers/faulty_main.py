"""`python -m clue_jax.main` with a disk fault injected, for read-only / full-disk tests.

usage: faulty_main.py ERRNO_NAME PATH_PART -- ARGS for clue_jax.main
Every open for writing of a path containing PATH_PART raises OSError(ERRNO_NAME)
(e.g. EROFS for a read-only workdir, ENOSPC for a full disk), through
builtins.open and os.open alike.
"""
import builtins
import errno
import os
import sys

_open, _os_open = builtins.open, os.open


def _fail_if_hit(path, writing):
    if writing and PART in os.fspath(path):
        code = getattr(errno, NAME)
        raise OSError(code, os.strerror(code), os.fspath(path))


def fake_open(file, mode="r", *args, **kwargs):
    _fail_if_hit(file, isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"))
    return _open(file, mode, *args, **kwargs)


def fake_os_open(path, flags, *args, **kwargs):
    _fail_if_hit(path, bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
    return _os_open(path, flags, *args, **kwargs)


if __name__ == "__main__":
    NAME, PART = sys.argv[1], sys.argv[2]
    assert sys.argv[3] == "--"
    builtins.open, os.open = fake_open, fake_os_open
    sys.argv = ["clue_jax.main", *sys.argv[4:]]
    from clue_jax import main

    main.run()
