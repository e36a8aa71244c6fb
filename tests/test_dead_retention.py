"""Retention of ``<ns>.dead`` (issue 19), against the real broker: it is bounded (count, bytes, age, the newest
kept), it holds records of refused messages rather than their bodies (which may hold prompts and secrets),
an install whose queue was declared without bounds still starts and is told the policy that bounds it, and
a producer's dead letter acts for a tenant only as its sender may."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import shlex
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.abc
import pytest
from redis.asyncio import Redis

from farebox.constants import H_CODE, H_STAGE, H_USER
from farebox.settings import CATALOG_DIR, Settings
from farebox.stages.deadletter import read_origin
from farebox.stages.messages import H_SOURCE_QUEUE
from farebox.stages.stage import Delivery
from farebox.stages.topology import dead_policy_command, declare_topology, delete_topology
from tests.support.pipeline import InProcessPipeline, get_message, ledger_entries
from tests.support.rabbit_users import as_user, rabbit_users, rabbitmqctl

SECRET = "sk-live-PLANTEDSECRET-9f8e7d6c5b4a"
PROVIDERS = ("openai",)


async def queue_info(name: str, *fields: str) -> dict[str, Any]:
    out = await asyncio.to_thread(rabbitmqctl, "list_queues", "-p", "/", "name", *fields, "--formatter", "json")
    return next(q for q in json.loads(out) if q["name"] == name)


async def drain(queue: aio_pika.abc.AbstractQueue) -> list[aio_pika.abc.AbstractIncomingMessage]:
    got = []
    while (m := await queue.get(no_ack=True, fail=False)) is not None:
        got.append(m)
    return got


async def replies_of(queue: aio_pika.abc.AbstractQueue, n: int, timeout: float = 60) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async with queue.iterator(no_ack=True) as messages:
        async with asyncio.timeout(timeout):
            async for m in messages:
                got.append(json.loads(m.body))
                if len(got) == n:
                    break
    return got


@pytest.fixture
async def pipelines(settings: Settings, emulator: str) -> AsyncIterator[list[InProcessPipeline]]:
    """Pipelines a test starts with settings of its own, closed afterwards."""
    started: list[InProcessPipeline] = []
    yield started
    for p in started:
        await p.close()


async def start(pipelines: list[InProcessPipeline], settings: Settings, *stages: str) -> InProcessPipeline:
    p = InProcessPipeline(settings)
    pipelines.append(p)
    await p.start(*stages)
    return p


async def test_the_dead_queue_is_a_bounded_quorum_queue(settings: Settings) -> None:
    """RabbitMQ 3.10 quorum queues take every bound: the oldest go past the count or the bytes, and at the TTL."""
    tight = settings.model_copy(update={"dead_max_length": 3, "dead_max_bytes": 1024, "dead_ttl_s": 1.0})
    connection = await aio_pika.connect(tight.amqp_url)
    async with connection:
        channel = await connection.channel()
        try:
            await declare_topology(channel, tight, PROVIDERS)
            info = await queue_info(tight.topology.dead, "type", "arguments")
            assert info["type"] == "quorum"
            arguments = {name: value for name, _type, value in info["arguments"]}
            assert arguments == {
                "x-queue-type": "quorum",
                "x-max-length": 3,
                "x-max-length-bytes": 1024,
                "x-message-ttl": 1000,
                "x-overflow": "drop-head",
            }
            dead = await channel.get_queue(tight.topology.dead)
            for i in range(5):
                await channel.default_exchange.publish(aio_pika.Message(b"%d" % i), routing_key=dead.name)
            assert [m.body for m in await drain(dead)] == [b"2", b"3", b"4"]  # the newest three
            for i in range(5):
                await channel.default_exchange.publish(aio_pika.Message(b"%d" % i * 400), routing_key=dead.name)
            assert [m.body[:1] for m in await drain(dead)] == [b"3", b"4"]  # 1,024 bytes hold two of 400
            await channel.default_exchange.publish(aio_pika.Message(b"old"), routing_key=dead.name)
            await asyncio.sleep(1.5)
            assert await drain(dead) == []
        finally:
            await delete_topology(channel, tight, PROVIDERS)


async def test_a_thousand_oversized_bodies_leave_bounded_records_and_no_secret(
    settings: Settings, redis: Redis, pipelines: list[InProcessPipeline]
) -> None:
    s = settings.model_copy(update={"max_body_bytes": 2048, "dead_max_length": 300, "dead_max_bytes": 64 * 1024})
    await start(pipelines, s, "dedup", "account")
    n = 1000
    bodies = [json.dumps({"prompt": f"{i} my key is {SECRET} " + "x" * 4000}).encode() for i in range(n)]
    connection = await aio_pika.connect(s.amqp_url)
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        for i in range(0, n, 100):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(b, reply_to=replies.name), routing_key=s.topology.intake
                    )
                    for b in bodies[i : i + 100]
                )
            )
        answers = await replies_of(replies, n)
        records = await drain(await channel.get_queue(s.topology.dead))
    assert all(a["status"] == "error" and a["error"]["code"] == "invalid_request" for a in answers)
    assert len({a["job_id"] for a in answers}) == n
    assert len(await ledger_entries(redis, s)) == n  # each refused job has its one entry
    assert 0 < len(records) <= s.dead_max_length
    assert sum(len(m.body) for m in records) <= s.dead_max_bytes
    assert not any(SECRET.encode() in m.body or SECRET in str(m.headers) for m in records)
    kept = [json.loads(m.body) for m in records]
    assert all(r["body_bytes"] > s.max_body_bytes and r["code"] == "invalid_request" for r in kept)
    assert hashlib.sha256(bodies[-1]).hexdigest() in {r["body_sha256"] for r in kept}  # the newest are kept


async def test_keep_bodies_keeps_the_raw_body(settings: Settings, pipelines: list[InProcessPipeline]) -> None:
    s = settings.model_copy(update={"dead_keep_bodies": True})
    await start(pipelines, s, "dedup", "account")
    text, binary = json.dumps({"prompt": SECRET, "qualty": "high"}).encode(), b"\xff\xfe" + SECRET.encode()
    connection = await aio_pika.connect(s.amqp_url)
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        for body in (text, binary):
            msg = aio_pika.Message(body, reply_to=replies.name)
            await channel.default_exchange.publish(msg, routing_key=s.topology.intake)
        await replies_of(replies, 2)
        records = [json.loads(m.body) for m in await drain(await channel.get_queue(s.topology.dead))]
    kept = {r["body_sha256"]: r for r in records}
    assert kept[hashlib.sha256(text).hexdigest()]["body"] == text.decode()
    assert base64.b64decode(kept[hashlib.sha256(binary).hexdigest()]["body_base64"]) == binary


async def test_an_unbounded_dead_queue_of_an_old_install_starts_with_one_warning_and_gets_no_raw_copies(
    settings: Settings, pipelines: list[InProcessPipeline], caplog: pytest.LogCaptureFixture
) -> None:
    s = settings.model_copy(update={"dead_max_length": 2})  # small, to see the policy bound the queue
    topo = s.topology
    connection = await aio_pika.connect(s.amqp_url)
    async with connection:
        channel = await connection.channel()
        dlx = await channel.declare_exchange(topo.dead_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        old = await channel.declare_queue(topo.dead, durable=True, arguments={"x-queue-type": "quorum"})
        await old.bind(dlx, routing_key="#")  # as declare_topology did before
        await channel.default_exchange.publish(aio_pika.Message(b"kept from before"), routing_key=topo.dead)
    caplog.set_level(logging.WARNING, logger="farebox.topology")
    await start(pipelines, s, "dedup", "account")  # four workers, each declaring the topology
    warnings = [r.getMessage() for r in caplog.records if r.name == "farebox.topology"]
    assert len(warnings) == 1 and topo.dead in warnings[0] and "PRECONDITION_FAILED" in warnings[0]
    command = dead_policy_command(s)
    assert warnings[0].endswith(command) and command.startswith("rabbitmqctl set_policy")
    connection = await aio_pika.connect(s.amqp_url)
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        body = json.dumps({"prompt": SECRET, "qualty": "high"}).encode()
        await channel.default_exchange.publish(aio_pika.Message(body, reply_to=replies.name), routing_key=topo.intake)
        answer = json.loads((await get_message(replies)).body)
        dead = await channel.get_queue(topo.dead)
        kept = await drain(dead)
        assert answer["error"]["code"] == "invalid_request"
        assert len(kept) == 2 and kept[0].body == b"kept from before"  # and a record, no raw copy
        assert SECRET.encode() not in kept[1].body and json.loads(kept[1].body)["kind"] == "dead_letter"
        # The command bounds the queue as it is: a policy applies to an existing queue.
        args = shlex.split(command)
        try:
            await asyncio.to_thread(rabbitmqctl, *args[1:])
            for _ in range(50):
                if (await queue_info(topo.dead, "policy"))["policy"]:
                    break
                await asyncio.sleep(0.1)
            for m in (b"a", b"b", b"c"):
                await channel.default_exchange.publish(aio_pika.Message(m), routing_key=topo.dead)
            assert [m.body for m in await drain(dead)] == [b"b", b"c"]
        finally:
            await asyncio.to_thread(rabbitmqctl, "clear_policy", "-p", "/", args[-3])


@pytest.mark.parametrize(
    ("vhost_path", "vhost"), [("/", "/"), ("", "/"), ("/prod", "prod"), ("/%2F", "/"), ("/a%20b", "a b")]
)
def test_the_policy_command_names_the_vhost_of_the_url(vhost_path: str, vhost: str) -> None:
    s = Settings(amqp_url=f"amqp://u:p@broker:5672{vhost_path}", namespace="fb-x", dead_ttl_s=60)
    args = shlex.split(dead_policy_command(s))
    assert args[:4] == ["rabbitmqctl", "set_policy", "-p", vhost]
    assert args[-2] == r"^fb\-x\.dead$"
    assert json.loads(args[-1]) == {
        "max-length": 10_000,
        "max-length-bytes": 64 * 1024 * 1024,
        "message-ttl": 60_000,
        "overflow": "drop-head",
    }


def _delivery(headers: dict[str, Any], user_id: str | None) -> Delivery:
    return Delivery("fb.dead.notify", b"{}", headers=headers, user_id=user_id)


def test_the_sender_in_a_header_is_trusted_only_from_the_pipeline_user() -> None:
    ours = {H_STAGE: "dedup", H_CODE: "invalid_request", H_USER: "victim", H_SOURCE_QUEUE: "fb.jobs"}
    origin = read_origin(_delivery(ours, "guest"), "guest")
    assert (origin.user_id, origin.stage, origin.queue) == ("victim", "dedup", "fb.jobs")
    # Put in the notify queue by someone else: its own user, whatever the headers say.
    assert read_origin(_delivery(ours, "mallory"), "guest").user_id == "mallory"
    # Dead-lettered by the broker: the original message, its headers the sender's own.
    broker = {**ours, "x-death": [{"queue": "fb.jobs", "reason": "delivery_limit"}]}
    origin = read_origin(_delivery(broker, "mallory"), "guest")
    assert (origin.user_id, origin.stage, origin.queue) == ("mallory", None, "fb.jobs")


@pytest.fixture(scope="module")
def amqp_users() -> Iterator[dict[str, str]]:
    with rabbit_users("victim", "mallory") as users:
        yield users


async def test_a_dead_letter_that_may_not_act_for_its_tenant_is_forbidden_with_no_ledger_entry(
    settings: Settings,
    redis: Redis,
    emulator: str,
    tmp_path: Path,
    amqp_users: dict[str, str],
    pipelines: list[InProcessPipeline],
) -> None:
    victim, mallory = amqp_users["victim"], amqp_users["mallory"]
    policy = json.loads((CATALOG_DIR / "policy.json").read_text())
    policy["auth"] = {"mode": "user_id", "users": {victim: ["victim"], mallory: ["mallory"]}}
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    s = settings.model_copy(update={"emulator_url": emulator, "policy": tmp_path / "policy.json"})
    await start(pipelines, s)
    async with InProcessPipeline(s.model_copy(update={"amqp_url": as_user(s.amqp_url, victim)})).client() as c:
        mine = await c.complete({"prompt": "The victim's private question", "job_id": "v-1"}, timeout=30)
    assert mine.status == "ok" and mine.tenant == "victim"
    bodies = {
        "replay": {"prompt": "x", "job_id": "v-1", "tenant": "victim", "qualty": "high"},  # the victim's job_id
        "claim": {"prompt": "x", "job_id": "m-2", "tenant": "victim", "qualty": "high"},
        "own": {"prompt": "x", "job_id": "m-3", "qualty": "high"},  # no tenant: mallory's only one
    }
    connection = await aio_pika.connect(as_user(s.amqp_url, mallory))
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        for corr, body in bodies.items():
            msg = aio_pika.Message(
                json.dumps(body).encode(), reply_to=replies.name, correlation_id=corr, user_id=mallory
            )
            await channel.default_exchange.publish(msg, routing_key=s.topology.intake)
        got = {a["job_id"]: a for a in await replies_of(replies, 3, timeout=30)}
    for job_id in ("v-1", "m-2"):
        assert got[job_id]["status"] == "error" and got[job_id]["error"]["code"] == "forbidden"
        assert got[job_id].get("content") is None and "private" not in json.dumps(got[job_id])
    assert got["m-3"]["error"]["code"] == "invalid_request" and got["m-3"]["tenant"] == "mallory"
    assert sorted(await ledger_entries(redis, s)) == ["m-3", "v-1"]  # no entry under a refused job_id
    connection = await aio_pika.connect(s.amqp_url)
    async with connection:
        records = [
            json.loads(m.body) for m in await drain(await (await connection.channel()).get_queue(s.topology.dead))
        ]
    assert sorted((r["job_id"], r["answer"], r["user_id"]) for r in records) == [
        ("m-2", "forbidden", mallory),
        ("m-3", "invalid_request", mallory),
        ("v-1", "forbidden", mallory),
    ]
