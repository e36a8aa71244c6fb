"""Lanes and fair shares (issue 19): interactive jobs are served ahead of background work at every stage,
through twin queues (``<queue>.interactive``); within a lane, tenants take turns for the provider calls."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from farebox.cli import build_parser
from farebox.client import FareboxClient
from farebox.constants import H_LANE, Topology
from farebox.emulator.knobs import EmulatorKnobs
from farebox.emulator.server import running
from farebox.routing.catalog import CatalogError
from farebox.routing.policy import parse_policy
from farebox.routing.priority import PriorityPolicy
from farebox.schemas import Envelope, Job
from farebox.settings import CATALOG_DIR, Settings
from farebox.stages import slots as slots_module
from farebox.stages.main import run_stage
from farebox.stages.messages import in_lane, slot_lane
from farebox.stages.slots import LaneSlots
from farebox.stages.stage import Delivery, Publish
from farebox.stages.topology import queue_plan, stage_queue_arguments
from tests.support.pipeline import InProcessPipeline, declared, drop_namespace, get_message
from tests.support.workload import ticket_jobs

BUNDLED_POLICY = json.loads((CATALOG_DIR / "policy.json").read_text())


def policy_file(tmp_path: Path, priority: dict[str, Any]) -> Path:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(dict(BUNDLED_POLICY, priority=priority)))
    return path


# --- names, policy, command line: no services ----------------------------------------------------------------
def test_every_stage_queue_has_an_interactive_twin_and_the_old_queues_keep_their_arguments() -> None:
    settings = Settings(namespace="lanes")
    topo = settings.topology
    plan = queue_plan(settings, ["openai", "google"])
    twins = {
        "lanes.jobs": "lanes.jobs.interactive",
        "lanes.route": "lanes.route.interactive",
        "lanes.execute.openai": "lanes.execute.openai.interactive",
        "lanes.execute.google": "lanes.execute.google.interactive",
        "lanes.account": "lanes.account.interactive",
    }
    for queue, twin in twins.items():
        assert topo.lane(queue, "interactive") == twin and topo.lane(queue, "background") == queue
        assert topo.lane_of(twin) == "interactive" and topo.lane_of(queue) == "background"
        assert topo.lane_base(twin) == queue
        assert plan[twin] == plan[queue]  # a quorum queue like its background one
    assert topo.intake_interactive == "lanes.jobs.interactive"
    # The queues of before keep exactly their arguments (a redeclare with others fails) and carry background work.
    assert plan["lanes.jobs"] == stage_queue_arguments(settings, max_length=settings.intake_max_length)
    assert plan["lanes.route"] == stage_queue_arguments(settings, max_length=settings.stage_max_length)
    # No twins for the coalescing, feedback and dead-letter queues.
    for queue in (topo.waiting, topo.waiting_batch, topo.recheck, topo.feedback, topo.dead, topo.dead_notify):
        assert topo.lane(queue, "interactive") == queue and queue + ".interactive" not in plan
    assert topo.is_batched("lanes.route.interactive") and topo.is_batched("lanes.execute.openai.interactive")
    assert not topo.is_batched("lanes.jobs.interactive")
    assert Topology().intake_interactive == "farebox.jobs.interactive"


def test_the_policy_sets_each_jobs_lane_in_order() -> None:
    policy = parse_policy(
        dict(
            BUNDLED_POLICY,
            priority={
                "default": "background",
                "tenants": {"helpdesk": "interactive", "bulk": "background"},
                "users": {"chat-frontend": "interactive", "etl": "background"},
                "weights": {"acme": 2, "*": 0.5},
            },
        ),
        "policy.json",
    ).priority

    def lane(user: str | None = None, intake: bool = False, **job: Any) -> str:
        return policy.lane(Job(prompt="hi", **job), user_id=user, interactive_intake=intake)

    assert lane() == "background"  # the default
    assert lane(tenant="helpdesk") == "interactive"  # the tenant's
    assert lane(tenant="helpdesk", user="etl") == "background"  # the sending user's, before the tenant's
    assert lane(tenant="bulk", user="chat-frontend") == "interactive"
    assert lane(tenant="bulk", intake=True) == "interactive"  # the interactive intake, before the policy
    assert lane(tenant="helpdesk", priority="background", intake=True) == "background"  # the job's own, first
    assert (policy.weight("acme"), policy.weight("other")) == (2, 0.5)
    # Without a "priority" section: background, every tenant weighing the same.
    bare = parse_policy(BUNDLED_POLICY, "policy.json").priority
    assert bare.lane(Job(prompt="hi"), user_id=None, interactive_intake=False) == "background"
    assert bare.weight("acme") == 1.0


def test_only_the_tenants_the_policy_allows_may_ask_for_the_interactive_lane() -> None:
    def policy(**priority: Any) -> PriorityPolicy:
        return parse_policy(dict(BUNDLED_POLICY, priority=priority), "policy.json").priority

    def lane(p: PriorityPolicy, tenant: str, user: str | None = None, intake: bool = False, **job: Any) -> str:
        return p.lane(Job(prompt="hi", tenant=tenant, **job), user_id=user, interactive_intake=intake)

    few = policy(allow_interactive=["helpdesk"], users={"chat": "interactive"}, tenants={"vip": "interactive"})
    assert lane(few, "helpdesk", priority="interactive") == "interactive"
    assert lane(few, "helpdesk", intake=True) == "interactive"
    assert lane(few, "bulk", priority="interactive") == "background"  # asked, not allowed: what the policy gives
    assert lane(few, "bulk", intake=True) == "background"
    assert lane(few, "bulk", user="chat", priority="interactive") == "interactive"  # the operator's entry for its user
    assert lane(few, "vip", priority="interactive") == "interactive"  # and for its tenant
    assert lane(few, "helpdesk", priority="background") == "background"  # anyone may ask for less
    anyone = policy(allow_interactive=["*"])
    assert lane(anyone, "bulk", priority="interactive") == lane(policy(), "bulk", priority="interactive")
    assert lane(policy(allow_interactive=[]), "bulk", intake=True) == "background"


@pytest.mark.parametrize(
    "priority, fragment",
    [
        ({"default": "urgent"}, "priority.default"),
        ({"tenants": {"acme": "now"}}, "priority.tenants.acme"),
        ({"weights": {"acme": 0}}, "weight"),
        ({"lanes": 2}, "priority.lanes"),
        ({"allow_interactive": "helpdesk"}, "priority.allow_interactive"),
    ],
)
def test_a_bad_priority_policy_is_refused(priority: dict[str, Any], fragment: str) -> None:
    with pytest.raises(CatalogError, match=fragment.replace(".", r"\.")):
        parse_policy(dict(BUNDLED_POLICY, priority=priority), "policy.json")


def test_submit_sends_background_work_and_ask_interactive_by_default() -> None:
    parser = build_parser()
    assert parser.parse_args(["submit", "jobs.jsonl"]).priority == "background"
    assert parser.parse_args(["submit", "jobs.jsonl", "--priority", "interactive"]).priority == "interactive"
    assert parser.parse_args(["ask", "hi"]).priority == "interactive"
    assert parser.parse_args(["worker", "all", "--lane", "interactive"]).lane == "interactive"
    assert parser.parse_args(["worker", "route"]).lane is None  # both lanes
    with pytest.raises(SystemExit):
        parser.parse_args(["ask", "hi", "--priority", "urgent"])


async def test_slots_go_to_interactive_jobs_first_then_to_tenants_by_weight() -> None:
    slots = LaneSlots(1, 0, weight=lambda tenant: 2.0 if tenant == "heavy" else 1.0)
    order: list[str] = []
    holder = asyncio.Event()

    async def job(lane: str, tenant: str, name: str, hold: asyncio.Event | None = None) -> None:
        async with slots.slot(lane, tenant):
            order.append(name)
            if hold is not None:
                await hold.wait()

    first = asyncio.create_task(job("background", "light", "first", holder))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(job("background", "light", f"light{i}")) for i in range(3)]
    waiting += [asyncio.create_task(job("background", "heavy", f"heavy{i}")) for i in range(4)]
    waiting.append(asyncio.create_task(job("interactive", "any", "interactive")))
    await asyncio.sleep(0)
    assert order == ["first"] and slots.waiting("background") == 7 and slots.waiting("interactive") == 1
    holder.set()
    await asyncio.gather(first, *waiting)
    # The interactive job first; then the heavy tenant (weight 2) twice for each turn of the light one, which
    # had the first slot already.
    assert order[:2] == ["first", "interactive"]
    assert order[2:] == ["heavy0", "heavy1", "light0", "heavy2", "heavy3", "light1", "light2"]
    assert slots.in_use == 0


async def test_interactive_jobs_have_a_reserve_background_work_cannot_take() -> None:
    slots = LaneSlots(2, 1)
    hold = asyncio.Event()

    async def job(lane: str) -> None:
        async with slots.slot(lane):
            await hold.wait()

    background = [asyncio.create_task(job("background")) for _ in range(3)]
    await asyncio.sleep(0)
    assert slots.in_use == 2 and slots.waiting("background") == 1  # the backfill has all it may have
    interactive = asyncio.create_task(job("interactive"))
    await asyncio.sleep(0)
    assert slots.in_use == 3 and slots.waiting("interactive") == 0  # started at once, in the reserve
    cancelled = asyncio.create_task(job("interactive"))
    await asyncio.sleep(0)
    cancelled.cancel()  # a waiter that goes away holds nothing
    with contextlib.suppress(asyncio.CancelledError):
        await cancelled
    hold.set()
    await asyncio.gather(*background, interactive)
    assert slots.in_use == 0 and slots.waiting("interactive") == slots.waiting("background") == 0


@pytest.mark.parametrize(
    ("queue", "lane", "sent_to", "header"),
    [
        ("lanes.route", "interactive", "lanes.route.interactive", None),  # a twin: the queue says the lane
        ("lanes.wait", "interactive", "lanes.wait", "interactive"),  # no twin: a header does
        ("lanes.account", "background", "lanes.account", None),
    ],
)
def test_a_job_keeps_its_lane_on_queues_without_a_twin(queue: str, lane: str, sent_to: str, header: str | None) -> None:
    topo = Topology("lanes")
    p = Publish(routing_key=queue, body=b"{}", lane=lane)
    sent = in_lane(topo, p) if lane != "background" else p
    assert (sent.routing_key, sent.headers.get(H_LANE)) == (sent_to, header)
    # The waiter dead-letters from wait to recheck with its headers; there it waits for its lane's slots.
    arrived = sent_to.replace(".wait", ".recheck")
    delivery = Delivery(arrived, b"{}", headers=sent.headers)
    assert slot_lane(topo, delivery) == lane
    forged = Delivery("lanes.route", b"{}", headers={H_LANE: "interactive"})
    assert slot_lane(topo, forged) == "background"  # a queue with a twin: the header counts for nothing


async def served_in_order(slots: LaneSlots, jobs: list[tuple[str, str]]) -> list[str]:
    """The order ``jobs`` (lane, name) get a slot of ``slots``, all queued while the first holds its slot."""
    order: list[str] = []
    gate = asyncio.Event()

    async def job(lane: str, name: str, hold: bool) -> None:
        async with slots.slot(lane):
            order.append(name)
            if hold:
                await gate.wait()

    head = asyncio.create_task(job(*jobs[0], True))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(job(lane, name, False)) for lane, name in jobs[1:]]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(head, *rest)
    assert slots.in_use == 0
    return order


async def test_work_marked_interactive_slows_a_backfill_down_and_never_stops_it() -> None:
    jobs = [("interactive", "i0"), ("background", "b0"), ("background", "b1")]
    jobs += [("interactive", f"i{i}") for i in range(1, 9)]
    # While both lanes wait, after 4 interactive grants the next goes to the backfill.
    order = await served_in_order(LaneSlots(1, 0, background_every=4), jobs)
    assert order == ["i0", "i1", "i2", "i3", "i4", "b0", "i5", "i6", "i7", "i8", "b1"]
    alternate = await served_in_order(LaneSlots(1, 0, background_every=1), jobs)
    assert alternate == ["i0", "i1", "b0", "i2", "b1", *(f"i{i}" for i in range(3, 9))]
    strict = await served_in_order(LaneSlots(1, 0, background_every=0), jobs)
    assert strict == ["i0", *(f"i{i}" for i in range(1, 9)), "b0", "b1"]  # strict priority, when asked for


async def test_background_turns_never_take_the_reserve_from_an_interactive_job_nobody_queued_ahead_of() -> None:
    slots = LaneSlots(2, 1, background_every=1)
    hold = asyncio.Event()
    started: list[str] = []

    async def job(lane: str, name: str, gate: asyncio.Event) -> None:
        async with slots.slot(lane):
            started.append(name)
            await gate.wait()

    backfill = [asyncio.create_task(job("background", f"b{i}", hold)) for i in range(3)]
    await asyncio.sleep(0)
    for i in range(3):  # one interactive job after another, each into the reserve while b2 waits
        done = asyncio.Event()
        one = asyncio.create_task(job("interactive", f"i{i}", done))
        await asyncio.sleep(0)
        assert started[-1] == f"i{i}" and slots.in_use == 3, started  # at once, not behind b2
        done.set()
        await one
    assert "b2" not in started  # the backfill has its capacity; the reserve stayed interactive
    hold.set()
    await asyncio.gather(*backfill)
    assert slots.in_use == 0


async def test_a_stream_of_one_job_tenants_leaves_a_bounded_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slots_module, "REMEMBERED", 50)
    slots = LaneSlots(1, 0)
    gate = asyncio.Event()

    async def job(tenant: str, hold: asyncio.Event | None = None) -> None:
        async with slots.slot("background", tenant):
            if hold is not None:
                await hold.wait()

    head = asyncio.create_task(job("first", gate))
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(job(f"t{i}")) for i in range(2000)]  # each tenant once: the clock never moves
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(head, *tasks)
    lane = slots._lanes["background"]
    assert len(lane.vtime) <= 51 and len(lane.idle) <= 4 * 50 + 1 and not lane.waiting and not lane.count
    assert slots.in_use == 0


# --- against the broker and Redis ------------------------------------------------------------------------------
async def test_a_priority_is_a_job_field_and_a_bad_one_is_an_invalid_request(pipeline: InProcessPipeline) -> None:
    await pipeline.start()
    async with pipeline.client() as client:
        ok = await client.complete(
            {"prompt": "Classify: fine.", "task": "classify", "priority": "background"}, timeout=30
        )
        connection = await aio_pika.connect(pipeline.settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            replies = await channel.declare_queue(exclusive=True)
            body = json.dumps({"prompt": "Classify: fine.", "priority": "urgent", "job_id": "bad-priority"}).encode()
            await channel.default_exchange.publish(
                aio_pika.Message(body, reply_to=replies.name, correlation_id="c"),
                routing_key=pipeline.settings.topology.intake,
            )
            answer = json.loads((await get_message(replies)).body)
    assert ok.status == "ok"
    assert answer["status"] == "error" and answer["error"]["code"] == "invalid_request"
    assert "priority" in answer["error"]["message"] and "urgent" not in answer["error"]["message"]


async def test_dedup_sends_each_job_on_in_its_lane(settings: Settings, tmp_path: Path) -> None:
    s = settings.model_copy(
        update={
            "batch_max": 1,  # one envelope per message, to read them one by one
            "policy": policy_file(
                tmp_path,
                {
                    "tenants": {"helpdesk": "interactive"},
                    "users": {"guest": "interactive"},
                    "allow_interactive": ["helpdesk", "acme"],
                },
            ),
        }
    )
    topo = s.topology
    p = InProcessPipeline(s)
    await p.start("dedup")
    try:
        connection = await aio_pika.connect(s.amqp_url)
        async with connection:
            channel = await connection.channel()
            sent = {
                "helpdesk-plain": ({"tenant": "helpdesk"}, topo.intake, None),
                "acme-plain": ({"tenant": "acme"}, topo.intake, None),
                "acme-guest": ({"tenant": "acme"}, topo.intake, "guest"),
                "acme-interactive-intake": ({"tenant": "acme"}, topo.intake_interactive, None),
                "helpdesk-says-background": ({"tenant": "helpdesk", "priority": "background"}, topo.intake, "guest"),
                "bulk-says-interactive": ({"tenant": "bulk", "priority": "interactive"}, topo.intake, None),
                "bulk-interactive-intake": ({"tenant": "bulk"}, topo.intake_interactive, None),
            }
            for job_id, (fields, queue, user) in sent.items():
                body = json.dumps({"prompt": f"Classify {job_id}", "job_id": job_id, **fields}).encode()
                await channel.default_exchange.publish(aio_pika.Message(body, user_id=user), routing_key=queue)
            lanes: dict[str, str] = {}
            queues = [
                await channel.declare_queue(q, passive=True) for q in (topo.route, topo.lane(topo.route, "interactive"))
            ]
            deadline = time.monotonic() + 20
            while len(lanes) < len(sent) and time.monotonic() < deadline:
                for queue in queues:
                    message = await queue.get(fail=False)
                    if message is not None:
                        await message.ack()
                        env = Envelope.model_validate_json(message.body)
                        assert topo.lane(topo.route, env.lane) == queue.name, (
                            env.job_id
                        )  # a queue holds its lane's jobs
                        lanes[env.job_id] = env.lane
                await asyncio.sleep(0.02)
    finally:
        await p.close()
    assert lanes == {
        "helpdesk-plain": "interactive",  # its tenant's
        "acme-plain": "background",  # the default
        "acme-guest": "interactive",  # its sender's (the RabbitMQ user)
        "acme-interactive-intake": "interactive",
        "helpdesk-says-background": "background",  # its own
        "bulk-says-interactive": "background",  # not a tenant allowed to ask for interactive
        "bulk-interactive-intake": "background",
    }


async def test_the_client_sends_interactive_jobs_through_the_interactive_intake(settings: Settings) -> None:
    topo = settings.topology
    got_interactive: list[dict[str, Any]] = []

    async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:  # standing in for the interactive worker
        got_interactive.append(json.loads(message.body))
        await message.ack()

    async with declared(settings) as channel:
        # The client uses the twin only while something consumes it (a rollback leaves it behind, unconsumed).
        await (await channel.declare_queue(topo.intake_interactive, passive=True)).consume(take)
        async with FareboxClient.from_settings(settings) as client:
            await client.publish({"prompt": "one", "job_id": "i"}, priority="interactive")
            await client.publish({"prompt": "two", "job_id": "b"}, priority="background")
            await client.publish({"prompt": "three", "job_id": "p"})  # no lane: the pipeline's policy decides
            await client.publish({"prompt": "four", "job_id": "own", "priority": "interactive"}, priority="background")
            plain = await channel.declare_queue(topo.intake, passive=True)
            got_plain = [json.loads((await get_message(plain)).body) for _ in range(2)]
            await wait_until(lambda: len(got_interactive) == 2, timeout=10)
    assert [(j["job_id"], j["priority"]) for j in got_interactive] == [("i", "interactive"), ("own", "interactive")]
    assert [(j["job_id"], j.get("priority")) for j in got_plain] == [("b", "background"), ("p", None)]


async def test_a_pipeline_from_before_the_lanes_gets_jobs_as_it_knows_them(
    settings: Settings, bare_intake: aio_pika.abc.AbstractQueue
) -> None:
    async with FareboxClient.from_settings(settings) as client:  # only the intake exists: no interactive twin
        await client.publish({"prompt": "hi", "job_id": "old"}, priority="interactive")
        body = json.loads((await get_message(bare_intake)).body)
    assert body == {"prompt": "hi", "job_id": "old"}  # no field an older pipeline would refuse


async def test_the_interactive_worker_serves_every_stage_of_its_lane_alone(settings: Settings, emulator: str) -> None:
    s = settings.model_copy(update={"emulator_url": emulator})
    stop, ready = asyncio.Event(), asyncio.Event()

    async def on_ready() -> None:
        ready.set()

    worker = asyncio.create_task(run_stage(s, "all", stop=stop, on_ready=on_ready, lanes=("interactive",)))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        async with FareboxClient.from_settings(s) as client:
            result = await client.complete({"prompt": "Classify: urgent!", "task": "classify"}, timeout=30)
            await client.publish({"prompt": "Classify: later.", "job_id": "bg"}, priority="background")
            connection = await aio_pika.connect(s.amqp_url)
            async with connection:
                plain = await (await connection.channel()).declare_queue(s.topology.intake, passive=True)
                consumers = plain.declaration_result.consumer_count
    finally:
        stop.set()
        await asyncio.wait_for(worker, 60)
        await drop_namespace(s)
    assert result.status == "ok"  # dedup, route, execute and account of the interactive lane, in one process
    assert consumers == 0  # background work is not its to take


@contextlib.asynccontextmanager
async def slow_provider_pipeline(settings: Settings) -> AsyncIterator[InProcessPipeline]:
    """Every stage, with each execute process allowed 4 calls at once to a provider that takes 100 ms: the
    calls are the bottleneck, and a backfill waits for them."""
    async with running(EmulatorKnobs(port=0, latency_ms=100)) as url:
        p = InProcessPipeline(settings.model_copy(update={"emulator_url": url, "provider_concurrency": 4}))
        try:
            await p.start()
            yield p
        finally:
            await p.close()


async def stream_counting(client: FareboxClient, jobs: list[dict[str, Any]], answered: list[str]) -> set[str | None]:
    """Stream ``jobs`` (background, stream()'s default), noting each answer; the providers that answered."""
    providers = set()
    async for r in client.stream(jobs, max_in_flight=len(jobs) + 1):
        assert r.status == "ok", r.error
        answered.append(r.job_id)
        providers.add(r.provider)
    return providers


async def wait_until(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tenant", ["b", "a"])  # another tenant; the backfill's own (tenants' turns cannot help it)
async def test_an_interactive_job_is_answered_ahead_of_a_backfill(settings: Settings, tenant: str) -> None:
    backfill = [dict(j, tenant="a") for j in ticket_jobs(120)]
    answered: list[str] = []
    async with slow_provider_pipeline(settings) as p, p.client() as producer, p.client() as client:
        task = asyncio.create_task(stream_counting(producer, backfill, answered))
        await wait_until(lambda: len(answered) >= 8)  # the backfill is queued and being worked through
        ahead = len(backfill) - len(answered)
        single = await client.complete(
            {"prompt": "Classify: my card was charged twice", "task": "classify", "quality": "low", "tenant": tenant},
            timeout=60,
        )  # interactive, complete()'s default
        done_before = len(answered)
        providers = await asyncio.wait_for(task, 90)
    assert single.status == "ok" and providers == {single.provider}  # both waited for the same provider's calls
    # A FIFO would have answered the jobs queued ahead of it first (about 120 x 100 ms / 4 calls = 3 s).
    assert ahead >= 100
    assert done_before - (len(backfill) - ahead) <= 30, f"{done_before} backfill jobs answered before it"


@pytest.mark.timeout(120)
async def test_tenants_in_one_lane_take_turns_for_the_provider_calls(settings: Settings) -> None:
    a_jobs = [dict(j, tenant="a") for j in ticket_jobs(120)]
    c_jobs = [dict(j, tenant="c") for j in ticket_jobs(12)]
    a_answered: list[str] = []
    c_answered: list[str] = []
    async with slow_provider_pipeline(settings) as p, p.client() as a, p.client() as c:
        a_task = asyncio.create_task(stream_counting(a, a_jobs, a_answered))
        await wait_until(lambda: len(a_answered) >= 8)
        await stream_counting(c, c_jobs, c_answered)  # a second backfill, behind the first in every queue
        a_done = len(a_answered)
        await asyncio.wait_for(a_task, 90)
    assert len(c_answered) == 12
    # Turn about: C's twelve calls took about 24 of the provider's turns; first come, first served, they
    # would have waited for all of A's.
    assert a_done <= 60, f"{a_done} of A's jobs answered before C's last"
