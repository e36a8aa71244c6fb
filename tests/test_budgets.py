"""Budgets through the real pipeline: alerts once per threshold, then the policy's action; and
enforcement that holds with four route replicas racing for one tenant's budget."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import aio_pika
from redis.asyncio import Redis

from farebox.routing.catalog import load_catalog
from farebox.routing.choose import choose_route
from farebox.routing.policy import load_policy, load_policy_router
from farebox.schemas import Job
from farebox.settings import CATALOG_DIR, Settings
from farebox.tokens import count_messages
from tests.support.pipeline import InProcessPipeline

PROMPT = "Give three reasons queues smooth out load spikes in backend systems."


def job(tenant: str, **kw: Any) -> dict[str, Any]:
    return {
        "prompt": PROMPT,
        "tenant": tenant,
        "task": "reason",
        "quality": "high",
        "max_tokens": 200,
        "cache": {"mode": "bypass"},
        "job_id": str(uuid.uuid4()),
        **kw,
    }


async def calibrate(settings: Settings, emulator: str, tmp_path: Path) -> tuple[float, float, str]:
    """(estimate the router reserves, actual cost, target) for one job: the emulator's answers are
    shorter than max_tokens, so the actual cost is well under the reservation."""
    policy = policy_with(tmp_path, [])
    est, target = estimate(policy)
    p = InProcessPipeline(
        settings.model_copy(
            update={"emulator_url": emulator, "policy": policy, "namespace": settings.namespace + "-cal"}
        )
    )
    try:
        await p.start()
        async with p.client() as client:
            actual = (await client.complete(job("calibration"), timeout=30)).cost_usd
    finally:
        await p.close()
    assert 0 < actual < est
    return est, actual, target


def estimate(policy_path: Path, **kw: Any) -> tuple[float, str]:
    j = Job(**job("any", **kw))
    policy = load_policy(policy_path)
    routed = choose_route(
        j,
        load_catalog(CATALOG_DIR / "model_costs.json"),
        policy,
        input_tokens=count_messages((m.role, m.content) for m in j.chat),
        router=load_policy_router(policy, policy_path),  # the bundled policy's, as the route stage loads it
    )
    return routed.decision.estimated_cost_usd, routed.decision.target


def policy_with(tmp_path: Path, budgets: list[dict[str, Any]]) -> Path:
    policy = json.loads((CATALOG_DIR / "policy.json").read_text())
    policy["budgets"] = budgets
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    return path


async def alert_queue(settings: Settings) -> tuple[aio_pika.abc.AbstractConnection, aio_pika.abc.AbstractQueue]:
    connection = await aio_pika.connect(settings.amqp_url)
    channel = await connection.channel()
    exchange = await channel.get_exchange(settings.topology.alerts_exchange)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, routing_key="budget.#")
    return connection, queue


async def drain(queue: aio_pika.abc.AbstractQueue) -> list[dict[str, Any]]:
    out = []
    while (message := await queue.get(fail=False, no_ack=True)) is not None:
        out.append(json.loads(message.body))
    return out


class WebhookSink:
    """A tiny HTTP server that records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> WebhookSink:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/alerts"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        )
        self.bodies.append(json.loads(await reader.readexactly(length)))
        writer.write(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()


async def test_tiny_budget_alerts_once_each_then_rejects(settings: Settings, emulator: str, tmp_path: Path) -> None:
    est, actual, _ = await calibrate(settings, emulator, tmp_path)
    limit = est + 3.5 * actual  # room for about four jobs once the first is settled
    webhook = await WebhookSink().__aenter__()
    s = settings.model_copy(
        update={
            "emulator_url": emulator,
            "alert_webhook_url": webhook.url,
            "policy": policy_with(
                tmp_path,
                [
                    {
                        "tenant": "tiny",
                        "period": "day",
                        "limit_usd": limit,
                        "alerts": [0.5, 0.8, 1.0],
                        "action": "reject",
                    }
                ],
            ),
        }
    )
    p = InProcessPipeline(s)
    try:
        await p.start()
        connection, alerts = await alert_queue(s)
        async with connection, p.client() as client:
            results = [await client.complete(job("tiny"), timeout=30) for _ in range(8)]
            other = await client.complete(job("someone-else"), timeout=30)
            await asyncio.sleep(0.3)
            fired = await drain(alerts)
    finally:
        await p.close()
        await webhook.__aexit__()
    statuses = [r.status for r in results]
    assert "ok" in statuses and "error" in statuses
    first_refusal = statuses.index("error")
    assert statuses[first_refusal:] == ["error"] * (8 - first_refusal)  # once refused, stays refused
    assert all(r.error and r.error.code == "budget_exceeded" for r in results[first_refusal:])
    assert "tiny" in results[-1].error.message and "PROMPT" not in results[-1].error.message  # type: ignore[union-attr]
    spent = sum(r.cost_usd for r in results)
    assert spent <= limit + max(r.cost_usd for r in results)  # overshoot at most one job
    assert other.status == "ok"  # another tenant is not affected
    assert sorted(a["threshold"] for a in fired) == [0.5, 0.8, 1.0]  # each exactly once
    assert {a["tenant"] for a in fired} == {"tiny"}
    assert sorted(b["threshold"] for b in webhook.bodies) == [0.5, 0.8, 1.0]  # the webhook got each once


async def test_downgrade_keeps_serving_on_the_cheapest_model(settings: Settings, emulator: str, tmp_path: Path) -> None:
    est, actual, target = await calibrate(settings, emulator, tmp_path)
    s = settings.model_copy(
        update={
            "emulator_url": emulator,
            "policy": policy_with(
                tmp_path,
                [{"tenant": "thrifty", "period": "month", "limit_usd": est + 0.5 * actual, "action": "downgrade"}],
            ),
        }
    )
    p = InProcessPipeline(s)
    try:
        await p.start()
        async with p.client() as client:
            results = [await client.complete(job("thrifty"), timeout=30) for _ in range(4)]
    finally:
        await p.close()
    assert all(r.status == "ok" for r in results)
    assert f"{results[0].provider}/{results[0].model}" == target
    downgraded = [r for r in results if r.route and "downgrade" in r.route.reason]
    assert downgraded and all(f"{r.provider}/{r.model}" != target for r in downgraded)
    assert all(r.cost_usd < results[0].cost_usd for r in downgraded)


async def test_four_route_replicas_overshoot_by_at_most_one_job(
    settings: Settings, redis: Redis, emulator: str, tmp_path: Path
) -> None:
    est, actual, _ = await calibrate(settings, emulator, tmp_path)
    limit = est + 10 * actual
    s = settings.model_copy(
        update={
            "emulator_url": emulator,
            "policy": policy_with(
                tmp_path, [{"tenant": "race", "period": "day", "limit_usd": limit, "action": "reject"}]
            ),
        }
    )
    p = InProcessPipeline(s)
    try:
        await p.start(
            "dedup",
            "route",
            "route#2",
            "route#3",
            "route#4",
            "execute:openai",
            "execute:anthropic",
            "execute:google",
            "account",
        )
        batch = [job("race", prompt=f"{PROMPT} ({i:03d})") for i in range(60)]
        async with p.client() as client:
            results = [r async for r in client.stream(batch, max_in_flight=60)]
    finally:
        await p.close()
    ok = [r for r in results if r.status == "ok"]
    refused = [r for r in results if r.error and r.error.code == "budget_exceeded"]
    assert len(ok) + len(refused) == 60 and ok and refused
    assert sum(r.cost_usd for r in ok) <= limit + max(r.cost_usd for r in ok)
    budget_hashes = [k async for k in redis.scan_iter(match=s.keys.budget("*", "*"), _type="hash")]
    assert len(budget_hashes) == 1
    assert int(await redis.hget(budget_hashes[0], "reserved_nusd")) == 0  # every reservation settled
