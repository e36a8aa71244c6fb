"""TLS for real (issue 21): a Redis server and a RabbitMQ node of the test's own that speak only TLS, with
certificates of a private CA (tests/support/tls.py), and the whole pipeline on them through ``rediss://`` and
``amqps://`` URLs that name the CA file. Verification is on: trusting another CA fails, and so does speaking
plain to a TLS port. A Sentinel set and a Redis Cluster over TLS run under ``-m cluster`` (`.ci/run` runs them)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import aio_pika
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from farebox.amqp_connect import connect_any
from farebox.redis_connect import RedisUrlError, connect_redis, parse_redis_url
from farebox.settings import Settings
from tests.support.chaos import distinct_jobs
from tests.support.pipeline import InProcessPipeline, collect, ledger_entries_written
from tests.support.rabbit_cluster import RabbitCluster, rabbit_cluster
from tests.support.redis_cluster import redis_cluster
from tests.support.redis_sentinel import sentinel_set
from tests.support.tls import Certificates, certificates, tls_redis


@pytest.fixture(scope="module")
def certs() -> Iterator[Certificates]:
    with certificates() as made:
        yield made


@pytest.fixture(scope="module")
def redis_tls_port(certs: Certificates) -> Iterator[int]:
    with tls_redis(certs) as port:
        yield port


@pytest.fixture(scope="module")
def rabbit_tls(certs: Certificates) -> Iterator[RabbitCluster]:
    with rabbit_cluster(1, tls=certs) as node:
        yield node


def rediss(port: int, ca: object, db: int = 0) -> str:
    return f"rediss://127.0.0.1:{port}/{db}?ssl_ca_certs={ca}"


@pytest.mark.parametrize("pipelining", [False, True])
async def test_rediss_with_the_private_ca_talks_tls(certs: Certificates, redis_tls_port: int, pipelining: bool) -> None:
    client = connect_redis(rediss(redis_tls_port, certs.ca), pipelining=pipelining)
    try:
        assert await client.set("fb-tls-probe", "1") and await client.get("fb-tls-probe") == b"1"
        assert await client.delete("fb-tls-probe") == 1
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("url_of", "match"),
    [
        (lambda port, certs: rediss(port, certs.other_ca), "CERTIFICATE_VERIFY_FAILED"),
        (lambda port, certs: f"redis://127.0.0.1:{port}/0", None),  # plain Redis to the TLS port
    ],
    ids=["another-ca", "plain"],
)
async def test_redis_tls_is_verified_and_required(
    certs: Certificates, redis_tls_port: int, url_of, match: str | None
) -> None:  # type: ignore[no-untyped-def]
    client = connect_redis(url_of(redis_tls_port, certs), socket_timeout=5, socket_connect_timeout=5)
    try:
        with pytest.raises(RedisConnectionError, match=match):
            await client.ping()
    finally:
        await client.aclose()


async def test_amqps_with_the_private_ca_talks_tls_and_refuses_another(
    certs: Certificates, rabbit_tls: RabbitCluster
) -> None:
    node = rabbit_tls.nodes[0]
    connection = await connect_any([node.tls_url(certs.ca)])
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"over tls"), routing_key=queue.name)
        message = await queue.get(timeout=10)
        assert message.body == b"over tls"
    with pytest.raises(Exception, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        await aio_pika.connect(node.tls_url(certs.other_ca), timeout=10)


async def test_tls_options_reach_sentinel_and_cluster_clients(certs: Certificates) -> None:
    query = f"ssl_ca_certs={certs.ca}&ssl_cert_reqs=required"
    sentinel = connect_redis(f"rediss+sentinel://127.0.0.1:1/mymaster?{query}&ssl_ca_path={certs.ca.parent}")
    cluster = connect_redis(f"rediss+cluster://127.0.0.1:1,127.0.0.1:2?{query}")
    try:
        pools = [
            sentinel.connection_pool,
            *(s.connection_pool for s in sentinel.connection_pool.sentinel_manager.sentinels),
        ]  # type: ignore[attr-defined]
        for pool in pools:  # the master's connections and the sentinels' alike
            assert pool.connection_kwargs["ssl_ca_certs"] == str(certs.ca)
            assert pool.connection_kwargs["ssl_cert_reqs"] == "required"
            assert "SSL" in pool.connection_class.__name__
        assert sentinel.connection_pool.connection_kwargs["ssl_ca_path"] == str(certs.ca.parent)
        made = cluster.nodes_manager.connection_kwargs  # type: ignore[attr-defined]
        assert made["ssl_ca_certs"] == str(certs.ca) and "SSL" in made["connection_class"].__name__
    finally:
        await sentinel.aclose()
        await cluster.aclose()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("rediss+cluster://127.0.0.1:1?ssl_ca_path=/etc/ssl", "takes only TLS options"),  # redis-py's has none
        ("rediss+cluster://127.0.0.1:1?ssl_cert_reqs=sometimes", "ssl_cert_reqs must be one of"),
        ("redis+sentinel://127.0.0.1:1/m?ssl_ca_certs=/ca.pem", "need a rediss+ URL"),
    ],
)
def test_tls_options_a_client_would_not_take_are_refused_in_one_line(url: str, says: str) -> None:
    with pytest.raises(RedisUrlError, match=re.escape(says)) as err:
        parse_redis_url(url)
    assert "\n" not in str(err.value)


async def test_the_pipeline_runs_over_tls_to_both_engines(
    settings: Settings, emulator: str, certs: Certificates, redis_tls_port: int, rabbit_tls: RabbitCluster
) -> None:
    amqps = rabbit_tls.nodes[0].tls_url(certs.ca)
    await run_jobs(
        settings.model_copy(update={"amqp_url": amqps, "emulator_url": emulator}), rediss(redis_tls_port, certs.ca)
    )


@pytest.mark.cluster  # about 13 s here; .ci/run runs it
async def test_the_pipeline_runs_behind_a_sentinel_over_tls(
    settings: Settings, emulator: str, certs: Certificates
) -> None:
    with sentinel_set(tls=certs) as sentinels:
        assert sentinels.url.startswith("rediss+sentinel://")
        await run_jobs(settings.model_copy(update={"emulator_url": emulator}), sentinels.url)


@pytest.mark.cluster  # 3 TLS masters take about 20 s to start here; .ci/run runs it
async def test_the_pipeline_runs_on_a_redis_cluster_over_tls(
    settings: Settings, emulator: str, certs: Certificates
) -> None:
    with redis_cluster(3, tls=certs) as cluster:
        assert cluster.url.startswith("rediss+cluster://")
        await run_jobs(settings.model_copy(update={"emulator_url": emulator}), cluster.url)


async def run_jobs(settings: Settings, redis_url: str) -> None:
    """40 jobs through the whole pipeline with ``redis_url``: a result each and a ledger entry each."""
    s = settings.model_copy(update={"redis_url": redis_url})
    url = redis_url
    jobs = distinct_jobs(40, "tls")
    pipeline = InProcessPipeline(s)
    try:
        await pipeline.start()
        async with pipeline.client() as client:
            results = await collect(client.stream(jobs, max_in_flight=10))
        assert sorted(r.job_id for r in results) == sorted(str(j["job_id"]) for j in jobs)
        assert all(r.status == "ok" for r in results), [r.error for r in results if r.error][:3]
        redis = connect_redis(url)
        try:
            entries = await ledger_entries_written(redis, s, len(jobs))
            assert sorted(entries) == sorted(str(j["job_id"]) for j in jobs)
        finally:
            await redis.aclose()
    finally:
        await pipeline.close()
