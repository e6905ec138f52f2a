"""Each benchmark's core in its smallest configuration, so the benches do not rot.

These start real processes (Redis, server, worker, the bench model server) on loopback, like
the benches themselves. They check that every measurement happened and the table renders;
they assert nothing about speed.
"""

from __future__ import annotations

import collections
import ipaddress

import pytest

from bench import batching, cluster, idle_sockets, pipeline, scaleout, streaming, support, users
from bench.support import Table, percentile

pytestmark = pytest.mark.slow


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([5.0], 0.99) == 5.0
    assert percentile([], 0.5) != percentile([], 0.5)  # NaN


def test_table_renders_rows_and_notes() -> None:
    table = Table("t", ["a", "b"])
    table.add("x", 1234.5)
    table.notes.append("note")
    assert table.render().splitlines() == [
        "### t",
        "",
        "| a | b       |",
        "|---|---------|",
        "| x | 1,234.5 |",
        "",
        "- note",
    ]


def test_pipeline_bench_smallest() -> None:
    options = pipeline.Options(sessions=2, seconds=0.5, xadd_requests=1000)
    result = pipeline.run(options)
    for measured in (result.echo_saturation, result.pipeline_saturation, result.pipeline_half):
        assert measured.load.ok and measured.load.errors == 0
    assert result.pipeline_saturation.cpu.redis_commands > 0
    assert "pipeline, saturated" in pipeline.table(result, options).render()


def test_idle_sockets_bench_smallest() -> None:
    options = idle_sockets.Options(sockets=20, settle_seconds=0.1, compression=(False,))
    (result,) = idle_sockets.run(options)
    assert result.opened == 20 and result.failed == 0
    assert result.ack_ms is not None
    assert "KiB per socket" in idle_sockets.table([result], options).render()


def test_streaming_bench_smallest() -> None:
    options = streaming.Options(rounds=1, tokens=4)
    result = streaming.run(options)
    assert result.model[0].tokens > 0 and result.stack[0].tokens > 0
    assert result.backend[0].tokens > 0 and result.backend[0].first_token_ms > 0
    assert result.uncoalesced[0].publishes >= result.stack[0].publishes
    for through in result.stack + result.uncoalesced:  # this reply's own, from the worker
        assert 0 < through.worker_first_ms < through.first_token_ms
    assert "model alone" in streaming.table(result, options).render()


def test_scaleout_bench_smallest() -> None:
    options = scaleout.Options(sessions=2, seconds=0.5, delay=0.05, layouts=((1, 1),))
    (row,) = scaleout.run(options)
    assert row.load.ok and row.load.errors == 0
    assert "replies/s" in scaleout.table([row], options).render()


def test_batching_bench_smallest() -> None:
    options = batching.Options(rounds=1, tokens=8, sessions=2)
    result = batching.run(options)
    for runs in result.series():
        assert runs and all(r.tokens > 0 for r in runs)
    assert "LocalBackend, 2 sessions" in batching.table(result, options).render()


def test_users_bench_smallest() -> None:
    options = users.Options(users=2, messages=2, delay=0.05, warm_up=2)
    rows = users.run(options)
    assert [row.concurrency for row in rows] == [users.OLD_DEFAULT, None]
    assert all(row.delivered == 4 for row in rows)
    assert "replies/s" in users.table(rows, options).render()


def test_cluster_bench_smallest() -> None:
    options = cluster.Options(sessions=3, seconds=0.5, warmup=0.3)
    rows = cluster.run(options)
    assert [row.layout for row in rows] == ["1 Redis", f"{cluster.MASTERS} masters"]
    for row in rows:
        assert row.load.ok and row.load.errors == 0
        assert all(node.commands > 0 and node.keys > 0 for node in row.meter.nodes)
    assert len(rows[1].meter.nodes) == cluster.MASTERS
    rendered = cluster.table(rows, options).render()
    assert "Redis CPU ms/msg" in rendered and "keys vs mean" in rendered


def test_cluster_bench_gives_each_session_its_own_address() -> None:
    addresses = {cluster.client_address(i) for i in range(1000)}
    assert len(addresses) == 1000
    assert all(ipaddress.ip_address(a) in ipaddress.ip_network("10.0.0.0/8") for a in addresses)
    assert cluster.deviations([1.0, 1.0, 2.0]) == pytest.approx([-25.0, -25.0, 50.0])


def test_a_spawned_object_answers_from_its_own_process() -> None:
    """bench.support.Spawned, which keeps the benches' llama.cpp references out of the
    process that runs the worker's backend: calls are answered, errors raised here."""
    spawned = support.Spawned(collections.Counter, "abracadabra")
    try:
        assert spawned.call("most_common", 1) == [("a", 5)]
        with pytest.raises(AttributeError):
            spawned.call("no_such_method")
        assert spawned.call("total") == 11  # still serving after an error
    finally:
        spawned.close()
    assert not spawned._process.is_alive()
