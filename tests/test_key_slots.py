"""Every Lua script's keys hash to one Redis Cluster slot, whatever the prefix, tenant, job_id or cache key.

The stages' own code builds the keys here (a fake Redis answers the scripts), with awkward names: braces in the
prefix, the tenant and the job_id, every kind of coalescing key, user-tier budgets, experiment and batch jobs.
``NamedScript`` refuses a call whose keys sit in two slots (``CrossSlot``), so a key added to a script without
its record's hash tag fails here, and so does a script with several keys that this test does not drive.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from farebox.constants import RedisKeys, job_record
from farebox.schemas import BudgetHold, Envelope, Feedback, Job, JobResult
from farebox.schemas.result import RouteInfo, StrategyRef
from farebox.settings import ProviderLimits, Settings
from farebox.stages import lua
from farebox.stages.batch_store import BatchStore
from farebox.stages.budgets import BudgetBook
from farebox.stages.cache_keys import CacheRules
from farebox.stages.dedup import DedupStage
from farebox.stages.feedback import FeedbackItem, FeedbackStage
from farebox.stages.ledger import CacheFill, KeptPrompt, Ledger
from farebox.stages.limits import SharedLimiter
from farebox.stages.shadow import Shadowing
from farebox.stages.stage import Delivery

WORKERS = Path(__file__).resolve().parent.parent / "workers"
PREFIXES = ("farebox:", "fb{x:", "fb}y:", "{all}:", "")
TENANTS = ("acme", "t.e@s-t_1")  # a tenant name holds no braces (schemas/job.py)
JOB_IDS = ("job-1", "a}b", "{x}", "}{")
CACHE_KEY = "9f" * 32
ENTRY_TS = 1_764_700_000.0


class ScriptCalls:
    """A stand-in for redis-py: registers scripts, answers them with canned replies, keeps every key list."""

    def __init__(self) -> None:
        self.registered: list[str] = []
        self.called: dict[str, list[list[str]]] = {}

    def register_script(self, source: str) -> Any:
        self.registered.append(source)

        async def run(keys: list[str], args: list[Any]) -> Any:
            self.called.setdefault(source, []).append(list(keys))
            return _reply(source, keys, args)

        return run

    async def exists(self, *keys: str) -> int:
        return 0

    async def get(self, key: str) -> None:
        return None


def _reply(source: str, keys: list[str], args: list[Any]) -> Any:
    """What each script would answer for a job seen the first time."""
    if "local fresh = 0" in source:  # the ledger's record: not answered, entry written now
        return [None, 1, None]
    if "local spent = {}" in source:  # budget settle: one spend per budget
        return [1000] * (len(keys) - 1)
    if "local cached = redis.call('GET', cache_key)" in source or "EXISTS', result_key" in source:
        return [b"lead"]
    if "cjson.decode(entry)" in source:  # feedback attach
        return [b"added", b"ab", b"rules", b"2026-12-02"]
    if "return {1, n, total}" in source:  # batch add
        return [1, 1, 100]
    if "now_parts" in source and "buckets" in source:
        return "0"
    return 1


@pytest.fixture(params=[(p, t, j) for p in PREFIXES for t in TENANTS for j in JOB_IDS], ids=lambda v: repr(v))
def names(request: pytest.FixtureRequest) -> tuple[str, str, str]:
    return cast(tuple[str, str, str], request.param)


def _settings(prefix: str) -> Settings:
    return Settings(redis_prefix=prefix, amqp_url="amqp://guest:guest@localhost:5672/")


def _result(tenant: str, job_id: str, *, lane: str = "sync") -> JobResult:
    route = RouteInfo(reason="test", strategy=StrategyRef(experiment="ab", arm="rules"), lane=lane)  # type: ignore[arg-type]
    return JobResult(
        job_id=job_id,
        status="ok",
        content="4",
        provider="openai",
        model="gpt-4o-mini",
        cost_usd=1e-5,
        tenant=tenant,
        route=route,
    )


def _holds(keys: RedisKeys, tenant: str) -> list[BudgetHold]:
    return [
        BudgetHold(key=keys.budget(tenant, "month:2026-12"), tenant=tenant, period="month:2026-12", limit_usd=5),
        BudgetHold(
            key=keys.budget(tenant, "day:2026-12-02", "free"), tenant=tenant, period="day:2026-12-02", limit_usd=1
        ),
    ]


def _leases(tenant: str, job_id: str) -> Iterator[str | None]:
    yield from (CACHE_KEY, f"{CACHE_KEY}|interactive", f"{CACHE_KEY}|batch", f"job:{job_record(tenant, job_id)}", None)


async def test_the_ledger_budget_and_cache_scripts_keep_each_call_in_one_slot(names: tuple[str, str, str]) -> None:
    prefix, tenant, job_id = names
    fake = ScriptCalls()
    keys = RedisKeys(prefix)
    ledger = Ledger(cast(Redis, fake), keys, result_ttl_s=86_400, entry_ttl_s=86_400, days_kept=2)
    for lease in _leases(tenant, job_id):
        for cache in (CacheFill(CACHE_KEY, "{}", 60), None):
            await ledger.record(
                _result(tenant, job_id, lane="batch"),
                ts=ENTRY_TS,
                cache=cache,
                lease_key=lease,
                budgets=_holds(keys, tenant),
                prompt=KeptPrompt("[]", 60),
                evaluation="shadow",
            )
    await BudgetBook(cast(Redis, fake), keys).reserve(job_record(tenant, job_id), _holds(keys, tenant), 1e-5)
    assert all(len(calls) >= 1 for calls in fake.called.values())
    assert len(fake.called) == 5  # record, fold, settle, fill; and reserve


async def test_dedup_decides_in_one_slot_per_script(names: tuple[str, str, str]) -> None:
    prefix, tenant, job_id = names
    fake = ScriptCalls()
    stage = DedupStage(_settings(prefix), cast(Redis, fake), rules=CacheRules)
    job = Job(prompt="2+2?", tenant=tenant, job_id=job_id)
    for lease in _leases(tenant, job_id):
        shared = lease is not None and not lease.startswith("job:")
        env = Envelope(
            job_id=job_id, job=job, received_at=0.0, cache_key=CACHE_KEY if shared else None, coalesce_key=lease
        )
        await stage._state(env)
    assert len(fake.called) == 2


async def test_feedback_limits_shadow_and_batch_scripts_keep_each_call_in_one_slot(
    names: tuple[str, str, str],
) -> None:
    prefix, tenant, job_id = names
    fake = ScriptCalls()
    settings = _settings(prefix)
    store = SimpleNamespace(current=lambda: (None, SimpleNamespace(feedback_sources=()), None))
    stage = FeedbackStage(settings, cast(Any, store), cast(Redis, fake))
    feedback = Feedback(job_id=job_id, tenant=tenant, score=0.5, source="grader")
    delivery = Delivery(queue="q", body=b"", user_id=settings.amqp_user)
    await stage.handle(FeedbackItem(feedback, delivery), delivery)
    limiter = SharedLimiter(cast(Redis, fake), settings.keys, tenant, ProviderLimits(rpm=60, tpm=6000, concurrency=2))
    assert await limiter.try_rate(100) == 0 and await limiter.try_slot("lease")
    store_of = BatchStore(cast(Redis, fake), settings.keys, job_id)
    limits = (10, 1000)
    await store_of.add("b1", "m", "c1", "{}", fresh=True, now=1.0, owner="w", claim_s=5, limits=limits)
    assert await store_of.claim("b1", "w", now=1.0, claim_s=5) and await store_of.move("b1", "w", "open", "sealed")
    assert await store_of.update("b1", "w", {"k": "v"}) and await store_of.handed_on("b1", "w", ["c1"])
    await store_of.hold_lease(CACHE_KEY, job_record(tenant, job_id))
    shadowing = Shadowing(settings, cast(Redis, fake))
    await shadowing._reserve(keys={"spend_key": settings.keys.shadow_spend("ab", "day:x")}, args=SPEND_ARGS)
    assert len(fake.called) == 10


SPEND_ARGS = {"estimate_nusd": 1, "cap_nusd": 2, "ttl_s": 60}


# The scripts with more than one key (or a tail of keys), each driven by a test above.
DRIVEN = {
    "budgets._RESERVE_LAYOUT",
    "ledger_scripts.RECORD_LAYOUT",
    "ledger_scripts.FOLD_LAYOUT",
    "ledger_scripts.SETTLE_LAYOUT",
    "ledger_scripts.FILL_LAYOUT",
    "dedup._DECIDE_CACHED_LAYOUT",
    "dedup._DECIDE_OWN_LAYOUT",
    "feedback._ATTACH_LAYOUT",
    "feedback._INDEX_LAYOUT",
    "limits._BUCKETS_LAYOUT",
    "batch_store._ADD_LAYOUT",
    "batch_store._OWNED_LAYOUT",
}


# Scripts sent only where Redis is one server, whose keys span slots by design (farebox/stages/one_trip.py,
# ledger_scripts.WHOLE).
ONE_SERVER = {"one_trip._SERVE_LAYOUT", "one_trip._RECORD_SERVED_LAYOUT", "ledger_scripts.WHOLE_LAYOUT"}


def test_every_script_with_more_than_one_key_is_driven_here() -> None:
    """A new script with several keys (or a second key for a one-key script) must be driven by a test above,
    where its keys are checked, and named in DRIVEN."""
    several = set()
    for path in sorted(WORKERS.glob("*.py")):
        module = importlib.import_module(f"farebox.stages.{path.stem}")
        for name, value in vars(module).items():
            if isinstance(value, lua.Layout) and (len(value.keys) > 1 or value.key_tail is not None):
                several.add(f"{path.stem}.{name}")
    assert several == DRIVEN | ONE_SERVER
    assert "NamedScript(" not in "".join(p.read_text() for p in (WORKERS.parent / "farebox").rglob("*.py"))
    declared = [p.stem for p in WORKERS.glob("*.py") for _ in range(p.read_text().count("one_server=True"))]
    assert sorted(declared) == ["ledger", "one_trip", "one_trip"]


def test_the_one_server_scripts_are_never_made_for_a_cluster() -> None:
    from farebox.patches.redis_pipelining import ClusterClient
    from farebox.stages.one_trip import OneTripHits, one_trip_hits

    account = cast(Any, SimpleNamespace(recorder=SimpleNamespace(ledger=None)))
    cluster = ClusterClient(host="127.0.0.1", port=1)
    assert one_trip_hits(Settings(), cast(Redis, cluster), account) is None
    assert not lua.one_server(cast(Redis, cluster)) and lua.one_server(cast(Redis, ScriptCalls()))
    from farebox.stages.account import Recorder

    assert not Recorder(Settings(), cast(Redis, cluster), "account", time.time).ledger.one_server
    assert isinstance(one_trip_hits(Settings(), cast(Redis, ScriptCalls()), account), OneTripHits)


def test_keys_beginning_alike_up_to_their_tag_share_a_slot() -> None:
    """The property the tags rest on: the slot comes from the first '{' to the first '}' after it."""
    for prefix in PREFIXES:
        keys = RedisKeys(prefix)
        for tenant in TENANTS:
            for job_id in JOB_IDS:
                record = job_record(tenant, job_id)
                own = [keys.result(record), keys.ledger_entry(record), keys.prompt(record), keys.feedback(record)]
                own += [keys.outcome(record), keys.arm(record), keys.inflight(f"job:{record}")]
                assert len({key_slot(k.encode()) for k in own}) == 1, own
                budgets = [keys.reservation(record), keys.budget(tenant, "m"), keys.budget(tenant, "d", "free")]
                assert len({key_slot(k.encode()) for k in budgets}) == 1, budgets
        ledger = [keys.ledger_agg("d"), keys.ledger_days, keys.ledger_stream, keys.ledger_arms("d")]
        ledger += [keys.ledger_folded("d"), keys.feedback_arms("d"), keys.feedback_folded("d"), keys.feedback_jobs]
        assert len({key_slot(k.encode()) for k in ledger}) == 1
        cache = [keys.cache(CACHE_KEY)] + [keys.inflight(CACHE_KEY + s) for s in ("", "|interactive", "|batch")]
        assert len({key_slot(k.encode()) for k in cache}) == 1


def test_an_untagged_key_in_a_script_fails_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check this file relies on: a cache key without its tag cannot go with its lease."""
    monkeypatch.setattr(RedisKeys, "cache", lambda self, key: f"{self.prefix}cache:{key}")
    keys = RedisKeys()
    with pytest.raises(lua.CrossSlot):
        lua.check_one_slot([keys.cache(CACHE_KEY), keys.inflight(CACHE_KEY)])
    assert json.dumps(keys.cache("k"))  # the patched builder is the one in use
