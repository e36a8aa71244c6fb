"""FAREBOX_REDIS_URL's three forms (a server, a Sentinel's master, a Redis Cluster), and the pipeline on a
Sentinel-watched Redis whose master fails over in the middle of a run."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis
from pydantic import ValidationError
from redis.asyncio import Redis

from farebox.emulator.knobs import EmulatorKnobs
from farebox.emulator.server import running
from farebox.errors import REDIS_DOWN
from farebox.patches.redis_pipelining import ClusterClient, NotReplicated, PipeliningRedis
from farebox.redis_connect import (
    RedisTarget,
    RedisUrlError,
    SentinelPipeliningRedis,
    SentinelRedis,
    connect_redis,
    parse_redis_url,
)
from farebox.settings import Settings
from tests.support.chaos import distinct_jobs
from tests.support.pipeline import InProcessPipeline, collect, ledger_entries_written
from tests.support.redis_sentinel import SentinelSet, sentinel_set

S = "redis+sentinel"
C = "redis+cluster"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost:6379/0", RedisTarget("server", "redis://localhost:6379/0")),
        ("rediss://u:p@h:6380/2", RedisTarget("server", "rediss://u:p@h:6380/2")),
        ("unix:///run/redis.sock?db=1", RedisTarget("server", "unix:///run/redis.sock?db=1")),
        (
            f"{S}://h1,h2:26380/mymaster",
            RedisTarget("sentinel", f"{S}://h1,h2:26380/mymaster", (("h1", 26379), ("h2", 26380)), "mymaster"),
        ),
        (
            f"{S}://:pw@h1:1/m/3",
            RedisTarget("sentinel", f"{S}://:pw@h1:1/m/3", (("h1", 1),), "m", db=3, username=None, password="pw"),
        ),
        (
            "rediss+sentinel://u:p%40ss@[::1]:26379/m?sentinel_password=sp&sentinel_username=su",
            RedisTarget(
                "sentinel",
                "rediss+sentinel://u:p%40ss@[::1]:26379/m?sentinel_password=sp&sentinel_username=su",
                (("::1", 26379),),
                "m",
                username="u",
                password="p@ss",
                tls=True,
                sentinel_username="su",
                sentinel_password="sp",
            ),
        ),
        (f"{C}://h1:7000,h2:7001", RedisTarget("cluster", f"{C}://h1:7000,h2:7001", (("h1", 7000), ("h2", 7001)))),
        (f"{C}://h/0", RedisTarget("cluster", f"{C}://h/0", (("h", 6379),))),
        (
            "rediss+cluster://default:pw@h1",
            RedisTarget("cluster", "rediss+cluster://default:pw@h1", (("h1", 6379),), None, 0, "default", "pw", True),
        ),
    ],
)
def test_a_redis_url_names_its_deployment(url: str, expected: RedisTarget) -> None:
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("memcached://h:11211", "unknown form"),
        ("localhost:6379", "unknown form"),
        (f"{S}://h1", "ends in /MASTER_NAME"),
        (f"{S}://h1/m/0/extra", "ends in /MASTER_NAME"),
        (f"{S}://h1/m/zero", "'zero' is not a database number"),
        (f"{S}://h1:port/m", "'port' is not a port"),
        (f"{S}://h1:70000/m", "'70000' is not a port"),
        (f"{S}://h1,,h2/m", "an empty host"),
        (f"{S}://h1/m?sentinel_pasword=x", "unknown option(s) sentinel_pasword"),
        (f"{C}://h1/1", "only database 0"),
        (f"{C}://h1/0/1", "only database 0"),
        (f"{C}://h1?ssl=true", "takes only TLS options"),
        (f"{C}://h1?ssl_ca_certs=/ca.pem", "need a rediss+ URL"),
        ("rediss+cluster://h1?ssl_check_hostname=perhaps", "ssl_check_hostname must be true or false"),
        (f"{S}://h1/m?ssl_ca_certs=/ca.pem", "need a rediss+ URL"),
        (f"{C}://", "an empty host"),
    ],
)
def test_a_url_farebox_cannot_read_says_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(RedisUrlError, match="Redis URL") as err:
        parse_redis_url(url)
    assert says in str(err.value)


def test_a_sentinels_password_is_hidden_too() -> None:
    with pytest.raises(RedisUrlError) as err:
        parse_redis_url(f"{S}://:pw@h1:x/m?sentinel_password=TOPSECRET&sentinel_username=su")
    assert "TOPSECRET" not in str(err.value) and ":pw@" not in str(err.value)
    assert "sentinel_password=***" in str(err.value)


def test_a_bad_redis_url_is_a_settings_error_that_hides_the_password() -> None:
    with pytest.raises(ValidationError) as err:
        Settings(redis_url=f"{S}://u:hunter2@h1:x/m")
    shown = str(err.value.errors(include_input=False)[0]["msg"])
    assert "'x' is not a port" in shown
    assert "hunter2" not in shown


@pytest.mark.parametrize(
    ("url", "pipelining", "made"),
    [
        ("redis://127.0.0.1:1/0", True, PipeliningRedis),
        ("redis://127.0.0.1:1/0", False, Redis),
        (f"{S}://127.0.0.1:1/m", True, SentinelPipeliningRedis),
        (f"{S}://127.0.0.1:1/m", False, SentinelRedis),
        (f"{C}://127.0.0.1:1", True, ClusterClient),  # pipelining steps aside: the cluster client routes by slot
        (f"{C}://127.0.0.1:1", False, ClusterClient),
    ],
)
async def test_each_form_gets_its_client(url: str, pipelining: bool, made: type) -> None:
    client = connect_redis(url, pipelining=pipelining, socket_timeout=1.0)
    try:
        assert type(client) is made  # nothing is connected until the first command
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def sentinels() -> Iterator[SentinelSet]:
    """One master, its replica and a Sentinel for this module's tests (starting them takes seconds)."""
    with sentinel_set() as started:
        yield started


def replica_port(cluster: SentinelSet) -> int:
    master = cluster.master_address()[1]
    return cluster.replica_port if master == cluster.master_port else cluster.master_port


async def test_a_sentinel_client_writes_to_the_master_and_closes_what_it_opened(sentinels: SentinelSet) -> None:
    client = connect_redis(sentinels.url, pipelining=True, socket_timeout=2.0)
    try:
        await client.set("fb:one", "1")
        async with Redis(port=sentinels.master_address()[1]) as direct:
            assert await direct.get("fb:one") == b"1"
        assert sentinel_clients(sentinels.sentinel_port) >= 2  # this probe, and the client's own
    finally:
        await client.aclose()
    # Closing the client closed its connections to the sentinels too: only this probe is left.
    assert sentinel_clients(sentinels.sentinel_port) == 1


def sentinel_clients(port: int) -> int:
    with redis.Redis(port=port, socket_timeout=2) as probe:
        return int(probe.info("clients")["connected_clients"])


async def test_writes_no_replica_confirms_fail_as_redis_away(settings: Settings) -> None:
    """The machine's Redis has no replica: with one required, every pipeline fails with NotReplicated (a
    REDIS_DOWN error the stages answer by writing again later), alone or together, and the client goes on."""
    client = connect_redis(settings.redis_url, pipelining=True, wait_replicas=1, wait_timeout_ms=20)
    key = f"{settings.redis_prefix}wait"
    try:
        with pytest.raises(NotReplicated):
            await client.set(key, "1")
        outcomes = await asyncio.gather(client.incr(key), client.get(key), return_exceptions=True)
        assert all(isinstance(o, NotReplicated) and isinstance(o, REDIS_DOWN) for o in outcomes)
        client.require_replicas(0, 20)  # type: ignore[attr-defined]
        assert await client.get(key) == b"2"  # the writes were made; only their copies were missing
    finally:
        await client.aclose()


async def test_commands_sent_alone_after_an_encoding_error_wait_for_the_replicas_too(settings: Settings) -> None:
    """A command redis-py cannot encode makes the client send the turn's commands one by one: the writes among
    them must still count only once the replicas have them."""
    client = connect_redis(settings.redis_url, pipelining=True, wait_replicas=1, wait_timeout_ms=20)
    key = f"{settings.redis_prefix}wait-alone"
    try:
        outcomes = await asyncio.gather(
            client.set(key, None),  # type: ignore[arg-type]  # redis-py refuses to encode None
            client.incr(key),
            return_exceptions=True,
        )
        assert all(isinstance(o, NotReplicated) for o in outcomes), outcomes
    finally:
        await client.aclose()


async def test_writes_a_replica_confirms_count(sentinels: SentinelSet) -> None:
    client = connect_redis(sentinels.url, pipelining=True, wait_replicas=1, wait_timeout_ms=2000)
    try:
        assert await asyncio.gather(client.set("fb:a", "1"), client.incr("fb:n")) == [True, 1]
        async with Redis(port=replica_port(sentinels)) as replica:
            assert await replica.get("fb:a") == b"1"
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("url", "pipelining"), [("redis+cluster://127.0.0.1:1", True), ("redis://127.0.0.1:1/0", False)]
)
def test_waiting_for_replicas_needs_the_pipelining_client_off_a_cluster(url: str, pipelining: bool) -> None:
    with pytest.raises(RedisUrlError, match="waiting for Redis replicas"):
        connect_redis(url, pipelining=pipelining, wait_replicas=1)
    with pytest.raises(ValidationError, match="not available on a Redis Cluster"):
        Settings(redis_url="redis+cluster://127.0.0.1:1", redis_wait_replicas=1)


@pytest.mark.cluster  # a failover takes about 25 s here; .ci/run runs it
async def test_the_pipeline_loses_no_job_when_the_sentinels_master_fails_over(
    settings: Settings, sentinels: SentinelSet
) -> None:
    """Between the replica's promotion and the old master's demotion (about 10 s here) the old master still
    takes writes, and loses them when it follows the new one: with redis_wait_replicas=1 no write counts
    until the replica has it, so every ledger entry survives."""
    async with running(EmulatorKnobs(port=0, latency_ms=300)) as emulator:
        cluster = sentinels
        s = settings.model_copy(update={"redis_url": cluster.url, "emulator_url": emulator, "redis_wait_replicas": 1})
        p = InProcessPipeline(s)
        jobs = distinct_jobs(500, "sentinel")
        try:
            await p.start()
            async with p.client() as client:
                collecting = asyncio.create_task(collect(client.stream(jobs, max_in_flight=20)))
                await asyncio.sleep(1.5)
                await asyncio.to_thread(cluster.fail_over)
                assert not collecting.done()  # the master switched under a running backfill
                results = await asyncio.wait_for(collecting, 180)
            assert sorted(r.job_id for r in results) == sorted(str(j["job_id"]) for j in jobs)
            assert all(r.status == "ok" for r in results), [r.error for r in results if r.error][:3]
            async with Redis(port=cluster.master_address()[1]) as master:
                entries = await ledger_entries_written(master, s, len(jobs))  # held while Redis switched
                assert sorted(entries) == sorted(str(j["job_id"]) for j in jobs)
        finally:
            await p.close()
