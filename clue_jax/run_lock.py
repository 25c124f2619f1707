"""One run per workdir: an exclusive `flock` on `WORKDIR/.lock`, held until the process ends.

The kernel drops the lock when its holder dies (even by kill -9), so a lock
left by a dead run is simply taken over. The file names the holder (pid and
host) for the refusal message. Cloud workdirs (gs://...) have no flock and
are not locked; with several processes only process 0 takes the lock.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket

from clue_jax.errors import UserInputError

log = logging.getLogger("clue_jax")

_held: dict[str, int] = {}  # workdir -> fd of its lock file, kept open while this process runs


def acquire(workdir: str) -> None:
    """Locks `workdir` or raises UserInputError naming it and the run that holds it."""
    if "://" in workdir or workdir in _held:
        return
    path = os.path.join(workdir, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "an unknown process"
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UserInputError(f"--workdir {workdir} is in use by {holder} (lock {path}); wait for that run "
                                 f"to end or use another --workdir") from None
        log.warning("cannot lock %s (%s); continuing without a lock", path, err.strerror)
        return
    previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
    if previous:
        log.info("lock %s: the earlier holder (%s) is gone; taking it over", path, previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
    _held[workdir] = fd


def release(workdir: str) -> None:
    fd = _held.pop(workdir, None)
    if fd is not None:
        os.ftruncate(fd, 0)
        os.close(fd)
