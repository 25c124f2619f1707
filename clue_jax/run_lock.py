"""One run per workdir: exclusive `flock`s on the workdir itself and on `WORKDIR/.lock`, held until the process ends.

The kernel drops the locks when their holder dies (even by kill -9), so a lock
left by a dead run is simply taken over. The lock that counts is the one on the
workdir directory: deleting `.lock` (say, because it looked stale) cannot free
it, so a second run is refused while the first lives. `.lock` names the holder
(pid and host) for the refusal message and is locked too, for filesystems that
cannot lock a directory (NFS), where deleting it does let a second run in.
With several processes only process 0 takes the lock.

A bucket (gs://...) has no flock, so there the lock is a lease: the object
`WORKDIR/.lock` names its holder (pid, host, a token) and the time it was last
renewed; a thread renews it every RENEW_S seconds, and a lock not renewed for
LEASE_S seconds belongs to a run that is gone (preempted, killed) and is taken
over. Taking it is write-then-read-back (object stores have no create-if-absent
through epath): of two runs starting within the same second, the one whose
write landed last wins and the other is refused. The lease uses the holders'
clocks, so hosts whose clocks differ by minutes can misjudge it.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import json
import os
import socket
import threading
import time
import uuid

from clue_jax import workdir_fs
from clue_jax.errors import UserInputError

log = logging.getLogger("clue_jax")

_held: dict[str, tuple[int | None, int | None]] = {}  # workdir -> fds of its lock file and its directory, kept open
_leases: dict[str, tuple[dict, threading.Event]] = {}  # bucket workdir -> (our lock record, stops its renewal)
LEASE_S, RENEW_S, SETTLE_S = 600.0, 120.0, 1.0
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def acquire(workdir: str) -> None:
    """Locks `workdir` or raises UserInputError naming it and the run that holds it."""
    if workdir in _held or workdir in _leases:
        return
    if workdir_fs.is_remote(workdir):
        _acquire_lease(workdir)
        return
    path = os.path.join(workdir, ".lock")
    dir_fd = _lock_directory(workdir, path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = _holder_of(fd)
        os.close(fd)
        if err.errno in _BUSY:
            if dir_fd is not None:
                os.close(dir_fd)
            _refuse(workdir, path, holder)
        if dir_fd is None:
            log.warning("cannot lock %s (%s); continuing without a lock", path, err.strerror)
            return
        fd = None  # the directory's lock alone guards the workdir
    else:
        previous = _holder_of(fd)
        if previous:
            log.info("lock %s: the earlier holder (%s) is gone; taking it over", path, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
    _held[workdir] = (fd, dir_fd)


def _lock_directory(workdir: str, path: str) -> int | None:
    """The directory's own flock (what a deleted `.lock` cannot free); None where the filesystem has none."""
    dir_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(dir_fd)
        if err.errno in _BUSY:
            try:
                with open(path, "rb") as f:
                    holder = f.read(200).decode(errors="replace").strip()
            except FileNotFoundError:
                holder = f"another run (its record {path} was deleted)"
            _refuse(workdir, path, holder)
        log.debug("cannot lock the directory %s (%s); the lock file alone guards it", workdir, err.strerror)
        return None
    return dir_fd


def _holder_of(fd: int) -> str:
    return os.pread(fd, 200, 0).decode(errors="replace").strip()


def _refuse(workdir: str, path: str, holder: str) -> None:
    raise UserInputError(f"--workdir {workdir} is in use by {holder or 'an unknown process'} (lock {path}); wait for "
                         f"that run to end or use another --workdir") from None


def _acquire_lease(workdir: str) -> None:
    lock = workdir_fs.join(workdir, ".lock")
    held = _read_lease(lock)
    if held is not None:
        age = time.time() - float(held.get("time", 0))
        if age < LEASE_S:
            raise UserInputError(f"--workdir {workdir} is in use by {_holder(held)} (lock {lock}, renewed {age:.0f} s "
                                 f"ago); wait for that run to end, or delete {lock} if it is gone")
        log.info("lock %s: the earlier holder (%s) has not renewed it for %.0f s; taking it over",
                 lock, _holder(held), age)
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex}
    _write_lease(lock, mine)
    time.sleep(SETTLE_S)  # a run starting at the same moment has written by now: the object says who won
    now = _read_lease(lock)
    if now is None or now.get("token") != mine["token"]:
        raise UserInputError(f"--workdir {workdir} is in use by {_holder(now or {})} (lock {lock}, taken at the "
                             f"same moment as this run); use another --workdir")
    stop = threading.Event()
    thread = threading.Thread(target=_renew, args=(lock, mine, stop), daemon=True, name="workdir-lock")
    thread.start()
    _leases[workdir] = (mine, stop, thread)


def _renew(lock: str, mine: dict, stop: threading.Event) -> None:
    """Rewrites the lease while it is still ours; a run that stalled past LEASE_S and lost it stops renewing."""
    while not stop.wait(RENEW_S):
        try:
            held = _read_lease(lock)
            if held is not None and held.get("token") != mine["token"]:
                log.error("lock %s was taken over by %s after this run stopped renewing it; no longer renewed",
                          lock, _holder(held))
                return
            _write_lease(lock, mine)
        except Exception as err:  # a network hiccup: the next renewal may succeed, the lease is long
            log.warning("cannot renew the lock %s: %s", lock, err)


def _write_lease(lock: str, mine: dict) -> None:
    workdir_fs.write_text(lock, json.dumps({**mine, "time": time.time()}))


def _read_lease(lock: str) -> dict | None:
    if not workdir_fs.exists(lock):
        return None
    try:
        value = json.loads(workdir_fs.read_text(lock))
    except ValueError:  # garbled: treated as a lock of a gone run
        return {}
    return value if isinstance(value, dict) else {}


def _holder(record: dict) -> str:
    return f"pid {record.get('pid', '?')} on host {record.get('host', '?')}"


def release(workdir: str) -> None:
    lease = _leases.pop(workdir, None)
    if lease is not None:
        mine, stop, thread = lease
        stop.set()
        thread.join()  # no renewal in flight may land after the unlink
        lock = workdir_fs.join(workdir, ".lock")
        if (_read_lease(lock) or {}).get("token") == mine["token"]:
            with workdir_fs.errors(lock, "release"):
                workdir_fs.path(lock).unlink()
    held = _held.pop(workdir, None)
    if held is not None:
        fd, dir_fd = held
        if fd is not None:
            os.ftruncate(fd, 0)
            os.close(fd)
        if dir_fd is not None:
            os.close(dir_fd)
