"""The pipeline on a 3-node RabbitMQ cluster the test starts (tests/support/rabbit_cluster.py), FAREBOX_AMQP_URL
listing its nodes: a backfill goes on while nodes are stopped under it, and every job still ends in exactly one
result and exactly one ledger entry, never charged twice.

The stages start at the first node listed (``amqp_spread`` off, so the test knows where they are) and must move
to another when it goes; the producer is on the third node, which is never stopped (a client whose node goes
loses the replies on its way: farebox/client.py). The quorum queues have a replica on every node, and a quorum
needs two of the three, so the full run (``-m cluster``) stops the second node and starts it again before it
kills the stages' node; the short run in the default suite kills the stages' node alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from farebox.amqp_connect import connect_any
from farebox.client import FareboxClient
from farebox.schemas import JobResult
from farebox.settings import Settings
from farebox.stages.topology import declare_topology
from tests.support.chaos import FaultReport, account_for, distinct_jobs
from tests.support.pipeline import InProcessPipeline
from tests.support.rabbit_cluster import Node, RabbitCluster, rabbit_cluster

FEED_PER_S = 40  # jobs a second until the stops are done, so they fall in the middle of the backfill


@pytest.fixture
def cluster() -> Iterator[RabbitCluster]:
    with rabbit_cluster(3) as started:
        yield started


def worker_ports(cluster: RabbitCluster, asking: Node, namespace: str) -> dict[int, int]:
    """How many of the namespace's stage connections each node (by AMQP port) holds."""
    found: dict[int, int] = {}
    for line in cluster.ctl(asking, "list_connections", "--no-table-headers", "port", "client_properties").splitlines():
        if f"farebox-{namespace}-" in line:
            port = int(line.split()[0])
            found[port] = found.get(port, 0) + 1
    return found


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def paced(jobs: list[dict[str, object]], released: asyncio.Event) -> AsyncIterator[dict[str, object]]:
    for job in jobs:
        if not released.is_set():
            await asyncio.sleep(1 / FEED_PER_S)
        yield job


@dataclass
class ClusterRun:
    settings: Settings
    report: FaultReport
    moved_to: dict[int, int]


async def backfill_through_stops(
    settings: Settings, redis: Redis, emulator: str, cluster: RabbitCluster, *, jobs: int, restart_second: bool
) -> ClusterRun:
    a, b, c = cluster.nodes
    s = settings.model_copy(update={"amqp_url": ",".join(cluster.urls), "amqp_spread": False, "emulator_url": emulator})
    producer = s.model_copy(update={"amqp_url": ",".join(n.url() for n in (c, a, b))})
    batch = distinct_jobs(jobs, f"cl{settings.namespace[-6:]}")
    report = FaultReport(f"{jobs} jobs, node stops", jobs)
    pipeline = InProcessPipeline(s)
    results: list[JobResult] = []
    released = asyncio.Event()
    started = time.monotonic()
    # Every queue is a quorum queue, the coalescing wait queues too: no policy is needed for the stages' node
    # to go (with the classic wait queues of before, the stages could not restore their channels elsewhere).
    try:
        await pipeline.start()
        assert set(worker_ports(cluster, c, s.namespace)) == {a.port}, "the stages did not start at the first node"
        async with FareboxClient.from_settings(producer, wait_for_pipeline_s=60) as client:

            async def collect() -> None:
                async for result in client.stream(paced(batch, released), max_in_flight=1000):
                    results.append(result)

            collecting = asyncio.create_task(collect())
            try:
                if restart_second:
                    await until(lambda: len(results) >= jobs // 6, "results before the first stop")
                    cluster.stop_node(b)  # not the stages' node: their connections stay, b's replicas go
                    await until(lambda: len(results) >= jobs // 4, "results with the second node stopped")
                    await asyncio.to_thread(cluster.start_node, b)
                await until(lambda: len(results) >= jobs // 3, "results before the stages' node goes")
                await asyncio.to_thread(cluster.kill_node, a)
                await until(lambda: len(results) >= jobs // 2, "results after the stages' node went", 180)
                moved_to = worker_ports(cluster, c, s.namespace)
                released.set()
                await asyncio.wait_for(asyncio.shield(collecting), 600)
            finally:
                released.set()
                collecting.cancel()
                await asyncio.gather(collecting, return_exceptions=True)
            report.repeated_results = client.repeats_dropped
    finally:
        await pipeline.close()
    report.elapsed_s = time.monotonic() - started
    return ClusterRun(s, await account_for(report, results, batch, redis, s), moved_to)


def assert_every_job_once(run: ClusterRun, cluster: RabbitCluster) -> None:
    report = run.report
    assert (report.results, report.lost, report.double_charged, report.errors) == (report.jobs, 0, 0, 0), report
    a = cluster.nodes[0]
    assert run.moved_to and a.port not in run.moved_to, f"the stages did not leave the stopped node: {run.moved_to}"


async def test_a_backfill_survives_the_stages_node_going(
    settings: Settings, redis: Redis, emulator: str, cluster: RabbitCluster
) -> None:
    run = await backfill_through_stops(settings, redis, emulator, cluster, jobs=200, restart_second=False)
    assert_every_job_once(run, cluster)
    assert set(run.moved_to) == {cluster.nodes[1].port}  # the next node listed


@pytest.mark.cluster
async def test_a_2000_job_backfill_survives_a_stop_of_each_of_two_nodes(
    settings: Settings, redis: Redis, emulator: str, cluster: RabbitCluster
) -> None:
    run = await backfill_through_stops(settings, redis, emulator, cluster, jobs=2000, restart_second=True)
    assert_every_job_once(run, cluster)


@pytest.mark.cluster  # a cluster of its own (about 30 s here); .ci/run runs it
async def test_the_quorum_group_size_setting_puts_each_quorum_queue_on_that_many_nodes(
    settings: Settings, cluster: RabbitCluster
) -> None:
    s = settings.model_copy(update={"amqp_url": ",".join(cluster.urls), "quorum_initial_group_size": 2})
    connection = await connect_any(s.amqp_urls)
    async with connection:
        await declare_topology(await connection.channel(), s, ["openai"])
    listed = cluster.ctl(cluster.nodes[0], "list_queues", "--no-table-headers", "name", "type", "members")
    rows = [line.split("\t") for line in listed.splitlines() if line.startswith(s.namespace + ".")]
    quorum = {name: members.count("@") for name, kind, members in rows if kind == "quorum"}
    assert len(quorum) > 10 and set(quorum.values()) == {2}, quorum
