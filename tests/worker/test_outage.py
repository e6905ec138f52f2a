"""Which Redis errors a worker waits out, and which end it (a bug must not loop forever)."""

from __future__ import annotations

import pytest
from redis.asyncio import Connection
from redis.exceptions import (
    BusyLoadingError,
    ConnectionError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TimeoutError,
)

from worker.outage import Episode, is_transient


@pytest.mark.parametrize(
    "error",
    [
        OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
        ReadOnlyError("You can't write against a read only replica."),
        BusyLoadingError("Redis is loading the dataset in memory"),
        ResponseError("MISCONF Redis is configured to save RDB snapshots, but ..."),
        ResponseError("BUSY Redis is busy running a script."),
        ResponseError("UNBLOCKED force unblock from blocking operation, instance state changed"),
        ResponseError("NOGROUP No such key 'chat:requests' or consumer group"),
        ConnectionError("Connection closed by server."),
        TimeoutError("Timeout reading from 127.0.0.1:6379"),
        OSError("network unreachable"),
    ],
)
def test_refusals_and_outages_are_waited_out(error: Exception) -> None:
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        ResponseError("ERR unknown command 'JSON.GET'"),
        ValueError("a bug"),
    ],
)
def test_other_errors_are_not(error: Exception) -> None:
    assert not is_transient(error)


def test_an_episode_logs_once_and_backs_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    episode = Episode("read")
    delays = [episode.failed(OutOfMemoryError("full")) for _ in range(10)]
    episode.ended()
    episode.ended()
    assert delays[:3] == [0.1, 0.2, 0.4] and delays[-1] == 5.0
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]


async def test_a_connection_torn_inside_redis_py_is_waited_out() -> None:
    """A topology refresh of the cluster client can close a connection another task is
    opening; redis-py then raises AttributeError from its connection code. The failover run
    of tests/system/test_cluster_faults.py stopped every worker on it ("read loop failed")."""
    connection = Connection()
    connection._writer = None  # what a concurrent disconnect leaves behind
    with pytest.raises(AttributeError) as torn:
        await connection._send_packed_command([b"PING"])
    assert is_transient(torn.value)


def test_the_same_classes_raised_elsewhere_are_bugs() -> None:
    def ours() -> None:
        raise AttributeError("'NoneType' object has no attribute 'token'")

    with pytest.raises(AttributeError) as bug:
        ours()
    assert not is_transient(bug.value)
    assert not is_transient(RuntimeError("dictionary changed size during iteration"))
