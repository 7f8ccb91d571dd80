"""Crash on purpose at a named point, for the crash-safety tests.

``STREAMREC_FAILPOINT=<name>:<n>`` makes the process ``kill -9`` itself the
n-th time it reaches ``failpoint(name)``: a real crash at an exact step of the
commit sequence, which random kills from outside hit only by luck. Unset (as
in production) a failpoint is one dict lookup.

Points: ``polled`` (batch in hand, nothing done), ``applied`` (Redis written,
dead letters not sent), ``handled`` (all effects durable, offsets not
committed), ``committed`` (offsets committed).
"""

from __future__ import annotations

import os
import signal

ENV = "STREAMREC_FAILPOINT"
_counts: dict[str, int] = {}


def _parse(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    name, _, n = value.partition(":")
    return name, int(n or "1")


_ARMED = _parse(os.environ.get(ENV))


def failpoint(name: str) -> None:
    if _ARMED is None or _ARMED[0] != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] >= _ARMED[1]:
        os.kill(os.getpid(), signal.SIGKILL)
