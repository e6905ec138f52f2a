"""Telling a Redis that refuses or is away for a while from a bug, and logging it once.

Redis answers some commands with an error that says "not now", not "never": OOM (maxmemory
reached with noeviction), READONLY (a replica, e.g. the old primary after a failover),
MISCONF (a failed save with stop-writes-on-bgsave-error), BUSY (a long script), LOADING (a
restart loading its data), UNBLOCKED (a blocked XREADGROUP cut off when its primary turned
replica: found by the failover run of tests/system/test_hostile_worker.py), and in a cluster
TRYAGAIN / CLUSTERDOWN / MASTERDOWN. A worker
retries those with backoff like a lost connection, and logs one line when an episode starts
and one when it ends, not one per attempt.
"""

from __future__ import annotations

import logging
import time
from pathlib import PurePath

from redis.exceptions import (
    BusyLoadingError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)

logger = logging.getLogger(__name__)

TRANSIENT_CODES = (
    "OOM",
    "READONLY",
    "MISCONF",
    "BUSY",
    "LOADING",
    "UNBLOCKED",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "NOREPLICAS",
)
_TRANSIENT_CLASSES = (OutOfMemoryError, ReadOnlyError, BusyLoadingError)


def is_nogroup(exc: BaseException) -> bool:
    return isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP")


# What a worker loop catches to ask `is_transient`: Redis's errors, the network's, and the two
# that redis-py lets out of a torn connection (see `is_torn_connection`).
REDIS_TROUBLE = (RedisError, OSError, AttributeError, RuntimeError)
_CONNECTION_MODULE = ("redis", "asyncio", "connection.py")


def is_torn_connection(exc: BaseException) -> bool:
    """True for the AttributeError ("'NoneType' object has no attribute 'writelines'") or
    RuntimeError (a write on a closed transport) that redis-py 8's cluster client raises from
    inside its connection code when a topology refresh (after MOVED, or a failover) recycles
    a connection another task is still opening. It is a lost connection, not a bug: found by
    tests/system/test_cluster_faults.py, where it stopped every worker at the failover. The
    same classes raised anywhere else are still bugs."""
    if not isinstance(exc, AttributeError | RuntimeError):
        return False
    frame = exc.__traceback__
    while frame is not None:
        if PurePath(frame.tb_frame.f_code.co_filename).parts[-3:] == _CONNECTION_MODULE:
            return True
        frame = frame.tb_next
    return False


def is_transient(exc: BaseException) -> bool:
    """True for an error that goes away by itself: a connection problem, or a refusal."""
    if is_torn_connection(exc):
        return True
    if isinstance(exc, _TRANSIENT_CLASSES) or is_nogroup(exc):
        return True
    if isinstance(exc, ResponseError):
        # redis-py strips the code from the errors it has a class for, not from the others.
        return str(exc).split(" ", 1)[0] in TRANSIENT_CODES
    return isinstance(exc, RedisError | OSError)


class Episode:
    """One loop's run of failures: logged when it starts and when it ends, with backoff."""

    def __init__(self, name: str, *, first_delay: float = 0.1, max_delay: float = 5.0) -> None:
        self.name = name
        self._first_delay = first_delay
        self._max_delay = max_delay
        self.failures = 0
        self._since = 0.0

    def failed(self, exc: BaseException) -> float:
        """Count a failure; returns how long to wait before trying again."""
        if self.failures == 0:
            self._since = time.monotonic()
            logger.warning(
                "%s: Redis refused or is unavailable (%s: %s); retrying with backoff, "
                "quietly until it answers",
                self.name,
                type(exc).__name__,
                exc,
            )
        self.failures += 1
        return float(min(self._first_delay * 2 ** (self.failures - 1), self._max_delay))

    def ended(self) -> None:
        """A success: if an episode was running, say it is over."""
        if self.failures:
            logger.info(
                "%s: Redis answers again after %.1f s (%d failed attempts)",
                self.name,
                time.monotonic() - self._since,
                self.failures,
            )
            self.failures = 0
