"""Tenants are who they authenticate as (policy auth mode user_id), with real RabbitMQ users: a job or a
feedback message may act only for the tenants its sender's user may; refused ones reach no cache entry, no
result record, no provider and no budget."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest
from redis.asyncio import Redis

from farebox.constants import JobRecord, job_record
from farebox.errors import Forbidden
from farebox.routing.auth import AuthPolicy, acting_tenant
from farebox.routing.catalog import CatalogError
from farebox.routing.policy import parse_policy
from farebox.settings import CATALOG_DIR, Settings
from tests.support.pipeline import InProcessPipeline, get_message, ledger_entries
from tests.support.rabbit_users import PASSWORD, as_user, delete_user, fresh_name, rabbit_users

USERS = {"svc-billing": ("acme",), "svc-batch": ("acme", "initech")}


@pytest.mark.unit
@pytest.mark.parametrize(
    ("user", "tenant", "given", "expected"),
    [
        ("svc-billing", "acme", True, "acme"),
        ("svc-billing", "default", False, "acme"),  # no tenant named: the user's only one
        ("svc-batch", "initech", True, "initech"),
        ("svc-batch", "default", False, "several tenants"),
        ("svc-billing", "initech", True, "may not act for tenant 'initech'"),
        ("mallory", "acme", True, "may not act for any tenant"),
        (None, "acme", True, "no AMQP user_id"),
        ("", "acme", True, "no AMQP user_id"),
    ],
)
def test_acting_tenant(user: str | None, tenant: str, given: bool, expected: str) -> None:
    auth = AuthPolicy(mode="user_id", users=USERS)
    if expected in ("acme", "initech"):
        assert acting_tenant(auth, user, tenant, given) == expected
    else:
        with pytest.raises(Forbidden, match=expected):
            acting_tenant(auth, user, tenant, given)


@pytest.mark.unit
def test_open_mode_trusts_the_body_and_user_id_mode_needs_users() -> None:
    assert acting_tenant(AuthPolicy(), None, "anyone", True) == "anyone"
    data = json.loads((CATALOG_DIR / "policy.json").read_text())
    data["auth"] = {"mode": "user_id"}
    with pytest.raises(CatalogError, match="needs 'users'"):
        parse_policy(data, "policy.json")


@pytest.fixture(scope="module")
def amqp_users() -> Iterator[dict[str, str]]:
    """Two real RabbitMQ users of this run, victim and mallory, removed afterwards."""
    with rabbit_users("victim", "mallory") as users:
        yield users


@pytest.fixture
async def auth_pipeline(settings: Settings, emulator: str, tmp_path: Path, amqp_users: dict[str, str]) -> Any:
    data = json.loads((CATALOG_DIR / "policy.json").read_text())
    data["auth"] = {"mode": "user_id", "users": {amqp_users["victim"]: ["victim"], amqp_users["mallory"]: ["mallory"]}}
    data["budgets"] = [{"tenant": "victim", "period": "day", "limit_usd": 100, "action": "reject"}]
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(data))
    s = settings.model_copy(update={"emulator_url": emulator, "policy": path})
    p = InProcessPipeline(s)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


async def test_mallory_cannot_act_for_the_victim(
    auth_pipeline: InProcessPipeline, amqp_users: dict[str, str], redis: Redis, emulator_stats: Any
) -> None:
    s = auth_pipeline.settings
    victim_url, mallory_url = (as_user(s.amqp_url, amqp_users[k]) for k in ("victim", "mallory"))
    victim = s.model_copy(update={"amqp_url": victim_url})
    mallory = s.model_copy(update={"amqp_url": mallory_url})
    prompt = {"prompt": "The victim's private question"}
    async with InProcessPipeline(victim).client() as client:
        mine = await client.complete({**prompt, "job_id": "v-1"}, timeout=30)  # no tenant: the user's only one
    assert mine.status == "ok" and mine.tenant == "victim"
    calls = await emulator_stats.total()
    async with InProcessPipeline(mallory).client() as client:
        stolen = await client.complete({**prompt, "tenant": "victim", "job_id": "m-1"}, timeout=30)
        replayed = await client.complete({**prompt, "tenant": "victim", "job_id": "v-1"}, timeout=30)
        rated = await client.feedback("v-1", "bad", tenant="victim")
    for r in (stolen, replayed):
        assert r.status == "error" and r.error is not None and r.error.code == "forbidden"
        assert r.content is None and "private" not in r.error.message
    assert rated is not None and rated.status == "error" and rated.error and rated.error.code == "forbidden"
    assert await emulator_stats.total() == calls  # no provider call for a refused job
    assert sorted(await ledger_entries(redis, s)) == ["v-1"]  # no record under a job id it may not use
    assert await redis.exists(s.keys.feedback(job_record("victim", "v-1"))) == 0
    spent = [k async for k in redis.scan_iter(match=s.keys.budget("victim", "*"))]
    assert len(spent) == 1  # the victim's own job; mallory's refused ones reserved nothing
    assert await redis.exists(s.keys.reservation(job_record("victim", "m-1"))) == 0
    assert len([k async for k in redis.scan_iter(match=s.keys.cache("*"))]) == 1  # the victim's own answer only


async def test_a_job_without_user_id_is_forbidden(auth_pipeline: InProcessPipeline, redis: Redis) -> None:
    s = auth_pipeline.settings
    connection = await aio_pika.connect(s.amqp_url)  # guest, publishing with no user_id property
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        body = json.dumps({"prompt": "hi", "tenant": "victim", "job_id": "anon-1"}).encode()
        await channel.default_exchange.publish(
            aio_pika.Message(body, reply_to=replies.name, correlation_id="c"), routing_key=s.topology.intake
        )
        reply = json.loads((await get_message(replies)).body)
    assert reply["status"] == "error" and reply["error"]["code"] == "forbidden"
    assert "no AMQP user_id" in reply["error"]["message"]
    assert await ledger_entries(redis, s) == []


async def test_tenants_add_gives_a_user_narrow_rights(
    settings: Settings, emulator: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from farebox.cli import main

    user = fresh_name("svc")
    monkeypatch.setenv("FAREBOX_NAMESPACE", settings.namespace)
    try:
        assert await asyncio.to_thread(main, ["tenants", "add", "victim", "--user", user, "--password", PASSWORD]) == 0
        data = json.loads((CATALOG_DIR / "policy.json").read_text())
        data["auth"] = {"mode": "user_id", "users": {user: ["victim"]}}
        path = tmp_path / "policy.json"
        path.write_text(json.dumps(data))
        s = settings.model_copy(update={"emulator_url": emulator, "policy": path})
        p = InProcessPipeline(s)
        await p.start()
        narrow = s.model_copy(update={"amqp_url": as_user(s.amqp_url, user)})
        try:
            async with InProcessPipeline(narrow).client() as client:  # jobs and feedback work with these rights
                result = await client.complete({"prompt": "hello"}, timeout=30)
                assert result.status == "ok" and result.tenant == "victim"
                receipt = await client.feedback(result.job_id, "good")
                assert receipt is not None and receipt.status == "ok"
            await assert_refused(narrow, lambda ch: ch.get_queue(s.topology.intake, ensure=False))  # read the intake
            await assert_refused(narrow, lambda ch: bind_alerts(ch, s, "budget.mallory"))  # another's alerts
            connection = await aio_pika.connect(narrow.amqp_url)
            async with connection:
                await bind_alerts(await connection.channel(), s, "budget.victim")  # its own alerts: allowed
        finally:
            await p.close()
    finally:
        await asyncio.to_thread(delete_user, user)


async def bind_alerts(channel: Any, settings: Settings, key: str) -> None:
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(settings.topology.alerts_exchange, routing_key=key)


async def assert_refused(settings: Settings, act: Any) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            result = act(channel)
            queue = await result
            if hasattr(queue, "get"):
                await queue.get(fail=False)


async def test_a_producer_cannot_publish_past_the_intake(
    auth_pipeline: InProcessPipeline, amqp_users: dict[str, str], redis: Redis
) -> None:
    # The default exchange reaches every queue, so mallory can put a forged envelope (the victim's tenant, an
    # answer of its own making) straight into the account stage's queue, or a forged dead letter into the
    # notify queue. In auth mode user_id stages take messages between them only from the pipeline's own user.
    from farebox.constants import H_CODE, H_STAGE
    from farebox.schemas import Envelope, Job, Outcome, Usage

    s = auth_pipeline.settings
    forged = Envelope(
        job_id="forged-1",
        job=Job(tenant="victim", prompt="anything"),
        received_at=0.0,
        outcome=Outcome(content="forged", provider="openai", model="gpt-4o-mini", usage=Usage(input_tokens=1)),
        budgets=(),
    ).model_dump_json()
    mallory = s.model_copy(update={"amqp_url": as_user(s.amqp_url, amqp_users["mallory"])})
    connection = await aio_pika.connect(mallory.amqp_url)
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        for queue, headers in (
            (s.topology.account, {}),
            (s.topology.dead_notify, {H_STAGE: "account", H_CODE: "internal"}),
        ):
            await channel.default_exchange.publish(
                aio_pika.Message(
                    forged.encode(), reply_to=replies.name, user_id=amqp_users["mallory"], headers=headers
                ),
                routing_key=queue,
            )
            reply = json.loads((await get_message(replies)).body)
            assert reply["status"] == "error" and reply.get("content") is None, queue
            # Refused at the account stage: forbidden. In the notify queue it reads as mallory's own producer
            # body dead-lettered by the broker: an error of mallory's own tenant, never the victim's.
            if queue == s.topology.account:
                assert reply["error"]["code"] == "forbidden"
            else:
                assert reply["tenant"] == "mallory"
    entries = [json.loads(await redis.get(k)) async for k in redis.scan_iter(match=s.keys.ledger_entry(JobRecord("*")))]
    assert [(e["tenant"], e["status"]) for e in entries] == [("mallory", "error")]  # nothing for the victim
    assert [k async for k in redis.scan_iter(match=s.keys.budget("victim", "*"))] == []
