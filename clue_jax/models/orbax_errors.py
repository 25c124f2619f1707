"""Orbax's failures as the project reports them: one line, no tracebacks of threads nobody waits for.

A failed write (full disk, denied permission) reaches orbax's caller as a
ValueError carrying tensorstore's status; `write_errors` turns it back into
the OSError it was, which the CLI prints as one line (exit 2). The logged
copies of that error, and the per-array aftermath of a failed read or write
(see below), are dropped; every other log record and unraisable exception
is reported as before.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys

_OS_CODE = re.compile(r"os_error_code='?(\d+)")
_STATUS_ERRNO = {"RESOURCE_EXHAUSTED": errno.ENOSPC, "PERMISSION_DENIED": errno.EACCES}


def os_error(err: BaseException, target: str) -> OSError | None:
    """Orbax/tensorstore's report of a failed write (a ValueError with a status) as the OSError it was."""
    if isinstance(err, OSError):
        return err
    text = str(err)
    code = _OS_CODE.search(text)
    status = next((s for s in _STATUS_ERRNO if text.startswith(s) or f" {s}:" in text), None)
    if code is None and status is None:
        return None
    number = int(code[1]) if code else _STATUS_ERRNO[status]
    return OSError(number, os.strerror(number), str(target))


class _HideWriteTracebacks(logging.Filter):
    """Orbax logs a failed write thread's traceback, then raises the error to the save or the next wait, where
    `write_errors` turns it into one line; the logged copies would bury that line under tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return error is None or os_error(error, "") is None


logging.getLogger("absl").addFilter(_HideWriteTracebacks())  # orbax logs through absl


# When one array of an orbax read or write fails, orbax's gather raises that error to the caller (here: a step set
# aside, a DamagedModel, an OSError) and closes its private event loop while the other arrays are still in flight.
# Their endings are then reported on their own, once per array, though nothing waits for them any more:
# tensorstore completing a future calls `call_soon_threadsafe` on the closed loop ("Exception ignored in: None ...
# Event loop is closed"); a suspended read coroutine, collected, turns its GeneratorExit into an Exception
# ("Exception ignored in: <coroutine _read_array_index_and_device_put>"); a failed read nobody awaited is logged by
# asyncio ("Future exception was never retrieved ... DATA_LOSS: ..."). Exactly these three are dropped.
_TENSORSTORE_STATUS = re.compile(r"[A-Z_]+: ")


def _is_orbax_aftermath(unraisable) -> bool:
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    error = unraisable.exc_value
    late_callback = (unraisable.object is None and isinstance(error, RuntimeError)
                     and str(error) == "Event loop is closed"
                     and tb is not None and tb.tb_frame.f_code.co_name == "_check_closed")
    abandoned_read = (getattr(unraisable.object, "__qualname__", "") == "_read_array_index_and_device_put"
                      and isinstance(getattr(error, "__cause__", None), GeneratorExit))
    return late_callback or abandoned_read


def _quiet_orbax_aftermath(previous):
    def hook(unraisable):
        if not _is_orbax_aftermath(unraisable):
            previous(unraisable)
    hook.quiets_orbax_aftermath = True
    return hook


if not getattr(sys.unraisablehook, "quiets_orbax_aftermath", False):
    sys.unraisablehook = _quiet_orbax_aftermath(sys.unraisablehook)


class _HideUnretrievedReads(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (str(record.msg).startswith("Future exception was never retrieved") and error is not None
                    and _TENSORSTORE_STATUS.match(str(error)))


logging.getLogger("asyncio").addFilter(_HideUnretrievedReads())


@contextlib.contextmanager
def write_errors(target: str):
    """Inside: orbax's write errors become an OSError naming `target` (the CLI prints it in one line)."""
    try:
        yield
    except Exception as err:
        converted = os_error(err, target)
        if converted is None or converted is err:
            raise
        raise converted from None
