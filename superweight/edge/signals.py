"""Signals never tear a W&B record: a handler raises through `interrupt`, which defers the exception while a
W&B call is in flight (`shielded()`) and raises it right after the call returns.

`superweight run` installs the handlers (SIGTERM -> Preempted, SIGINT -> KeyboardInterrupt); the tracker wraps
each short W&B call (log, summary, finish) in `shielded()`. Long calls that may wait on the network (an artifact
upload) stay outside the shield, so a preempted VM's grace period is spent marking the run, not waiting.
"""

from __future__ import annotations

import contextlib


class Preempted(SystemExit):
    """Raised by the SIGTERM handler of `superweight run` (exit code 143)."""

    def __init__(self):
        super().__init__(143)


_SHIELD = {"depth": 0, "pending": None}


@contextlib.contextmanager
def shielded(drop: bool = False):
    """Defer an exception a signal handler raises through `interrupt` until the W&B calls inside finish;
    `drop=True` discards it (while the run is already being closed). If a call inside fails while a signal
    waits, the signal's exception is raised chained from the failure (`__cause__`): the failure is kept for the
    record, and a SIGTERM still ends the run as preempted (requeued), not as a crash that drops the signal."""
    _SHIELD["depth"] += 1
    try:
        yield
    except BaseException as failure:
        _SHIELD["depth"] -= 1
        exc = _take(drop)
        if exc is not None and exc is not failure:
            raise exc from failure
        raise
    _SHIELD["depth"] -= 1
    exc = _take(drop)
    if exc is not None:
        raise exc


def _take(drop: bool) -> BaseException | None:
    """The signal waiting for the outermost shield to close (None inside a nested one, or when dropped)."""
    if _SHIELD["depth"]:
        return None
    exc, _SHIELD["pending"] = _SHIELD["pending"], None
    return None if drop else exc


def interrupt(exc: BaseException) -> None:
    """Raise exc now, or after the W&B call in flight; a second signal while one waits raises at once
    (a Ctrl-C pressed twice still stops a hung call)."""
    if _SHIELD["depth"] and _SHIELD["pending"] is None:
        _SHIELD["pending"] = exc
        return
    _SHIELD["pending"] = None
    raise exc
