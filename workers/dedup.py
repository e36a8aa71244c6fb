"""Dedup/cache stage: serve repeats from the cache, coalesce identical jobs in flight, replay
results for a job_id already done, and pass everything else to the router.

A cache hit and a job_id replay are answered here, through the account stage's own finish (the same result,
ledger entry and replies): the account stage sees only jobs it must price, and a hit costs one hop.

Coalescing: the first job for a key takes a lease in Redis (``SET NX`` with the job id as value)
and goes on as the leader. An identical job that arrives meanwhile waits: held here, unacked, until the
release of the lease wakes it (farebox/stages/wake.py), or parked in the broker's wait queue, from which it
comes back through ``recheck`` every ``coalesce_poll_ms``. Either way it then finds the leader's answer in the
cache (-> "coalesced", cost 0), or the leader failed and released its lease (-> the waiter takes over as
leader), or the lease expired (a leader that never finished; same). A held waiter goes back to the broker
when its process dies, and no wake is needed for correctness (a held waiter re-checks on a timer too).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from redis.asyncio import Redis

from farebox import metrics
from farebox.constants import as_text, job_record
from farebox.errors import REDIS_DOWN, DeadlineExceeded, FareboxError, Forbidden
from farebox.routing.auth import AuthPolicy, acting_tenant, internal_sender
from farebox.routing.batch_lane import BatchPolicy, price_lane
from farebox.routing.priority import PriorityPolicy
from farebox.schemas import Envelope, ErrorInfo, JobResult, Outcome
from farebox.settings import Settings
from farebox.stages.account import result_publish
from farebox.stages.cache_keys import CacheRules, cache_key, is_cacheable
from farebox.stages.decode import envelope_from_intake, envelope_from_internal
from farebox.stages.lua import Layout, NamedScript, Scalar
from farebox.stages.one_trip import LEASE, OneTripHits
from farebox.stages.redis_health import RedisHealth
from farebox.stages.stage import Delivery, EnvelopeStage, Handled, envelope_publish
from farebox.stages.wake import Waker

# A job that shares a cache entry: cached answer? else take (or find) the entry's lease. The lease sits with
# the entry (one slot), and being atomic, a leader that fills the cache and releases its lease can never
# slip in between. Whether the job_id is answered already is asked beside it (its own slot, same round trip).
_DECIDE_CACHED_LAYOUT = Layout(keys=("cache_key", "lease_key", "waiters_key"), args=("job_id", "lease_ttl_s", "wake"))
_DECIDE_CACHED = (
    """
local cached = redis.call('GET', cache_key)
if cached then
  return {'cached', cached}
end
"""
    + LEASE
)
# A job that reads no cache: answered job_id? else take (or find) its own lease, which sits with its result
# (one slot), so a copy can never take the lease between the leader's storing its result and releasing it.
_DECIDE_OWN_LAYOUT = Layout(
    keys=("result_key", "lease_key", "waiters_key"), args=("job_id", "lease_ttl_s", "coalesce", "wake")
)
_DECIDE_OWN = (
    """
if redis.call('EXISTS', result_key) == 1 then
  return {'answered'}
end
if coalesce ~= '1' then
  return {'route'}
end
"""
    + LEASE
)


class DedupStage(EnvelopeStage):
    name = "dedup"

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        rules: Callable[[], CacheRules],
        clock: Callable[[], float] = time.time,
        auth: Callable[[], AuthPolicy] = AuthPolicy,
        lanes: Callable[[], PriorityPolicy] = PriorityPolicy,
        batch: Callable[[], BatchPolicy] = BatchPolicy,
        finish: Callable[[Envelope], Awaitable[Handled]] | None = None,
        one_trip: OneTripHits | None = None,
    ) -> None:
        self.settings = settings
        self.auth = auth  # the policy's auth in force
        self.lanes = lanes  # the policy's priority in force
        self.batch = batch  # the policy's batch lane in force: how often a coalesced waiter re-checks
        self.redis = redis
        self.rules = rules
        self.clock = clock
        self.topo = settings.topology
        self.account_queue = self.topo.account
        self.keys = settings.keys
        self.health = RedisHealth(self.name)
        # The account stage's finish, to answer hits and replays here; without it they go on to that stage.
        self.finish = finish
        self.one_trip = one_trip  # on one Redis server: a hit looked up and recorded together (one_trip.py)
        self.waker = Waker(redis, self.keys.wake_channel, capacity=settings.coalesce_hold_max)
        # Each held waiter keeps its message unacked: the prefetch makes room for them on top of the jobs being
        # handled, which stay as many as before (the runtime's slots).
        self.prefetch = settings.prefetch + settings.coalesce_hold_max
        self.slots = settings.prefetch
        self._decide_cached = NamedScript(redis, _DECIDE_CACHED_LAYOUT, _DECIDE_CACHED, "dedup decide (cached)")
        self._decide_own = NamedScript(redis, _DECIDE_OWN_LAYOUT, _DECIDE_OWN, "dedup decide (own)")

    def input_queues(self) -> Sequence[str]:
        return (self.topo.intake_interactive, self.topo.intake, self.topo.recheck)

    async def beside(self, stop: asyncio.Event, publish: object) -> None:
        """Run by the runtime while the stage consumes: the subscription that wakes held waiters."""
        if self.waker.capacity > 0:
            await self.waker.listen(stop)

    def decode(self, delivery: Delivery) -> Envelope:
        if delivery.queue == self.topo.recheck:
            return envelope_from_internal(delivery, internal_sender(self.auth(), self.settings.amqp_user))
        return self._in_lane(envelope_from_intake(delivery, self.settings, self.rules(), self.clock()), delivery)

    def _in_lane(self, env: Envelope, delivery: Delivery) -> Envelope:
        """``env`` with the lane it runs in. An interactive job does not coalesce with background ones: it
        would wait for a leader that may sit behind a whole backfill (it may cost one call more instead)."""
        interactive_intake = delivery.queue == self.topo.intake_interactive
        lane = self.lanes().lane(env.job, user_id=delivery.user_id, interactive_intake=interactive_intake)
        update: dict[str, object] = {"lane": lane}
        if lane == "interactive" and env.cache_key is not None and env.coalesce_key == env.cache_key:
            update["coalesce_key"] = f"{env.cache_key}|interactive"
        elif env.cache_key is not None and env.coalesce_key == env.cache_key:
            # Nor a batch-lane job with a sync one: either would wait for the other's lane (hours, or behind
            # a leader on a lane it did not ask for).
            if price_lane(self.batch(), env.job, lane)[0] == "batch":
                update["coalesce_key"] = f"{env.cache_key}|batch"
        return env.model_copy(update=update)

    async def handle(self, env: Envelope, delivery: Delivery) -> Handled:
        if delivery.queue != self.topo.recheck:  # from the intake, of either lane
            env = self._authorized(env, delivery)
        if env.deadline_at is not None and self.clock() > env.deadline_at:
            raise DeadlineExceeded("the job passed its deadline_s before a provider was called")
        try:
            handled = await self._decide(env, delivery)
        except REDIS_DOWN as err:
            self.health.down(err)
            metrics.CACHE_BYPASSED.inc()
            return Handled([envelope_publish(env, self.topo.route)])
        self.health.ok()
        return handled

    def _authorized(self, env: Envelope, delivery: Delivery) -> Envelope:
        """``env`` as its sender may send it (the tenant its only one when it named none), or Forbidden before
        anything is looked up: a refused job reaches no cache entry, result, provider or budget."""
        job = env.job
        tenant = acting_tenant(self.auth(), delivery.user_id, job.tenant, "tenant" in job.model_fields_set)
        if tenant == job.tenant:
            return env
        job = job.model_copy(update={"tenant": tenant})
        rules = self.rules()
        key = cache_key(job, rules) if is_cacheable(job, rules) else None
        coalesce = key if key is not None and job.cache.mode == "use" else f"job:{job_record(tenant, env.job_id)}"
        return self._in_lane(env.model_copy(update={"job": job, "cache_key": key, "coalesce_key": coalesce}), delivery)

    def fail(self, item: object, err: FareboxError) -> Handled:
        if not isinstance(err, Forbidden):
            return super().fail(item, err)
        # Answered here, with no ledger entry: the job_id of a message that may not act for its tenant cannot
        # key a record (it may be another tenant's job's id, whose stored result must not be replayed to it).
        assert isinstance(item, Envelope)
        result = JobResult(
            job_id=item.job_id,
            tenant=item.job.tenant,
            status="error",
            error=ErrorInfo(code=err.code, message=str(err)),
        )
        reply = result_publish(result.model_dump_json().encode(), item.reply_to, item.correlation_id, item.job_id)
        return Handled(reply)

    def _lease_of(self, env: Envelope) -> str:
        """The coalescing key whose lease ``env`` leads or waits for: its shared one, or its own job's."""
        return env.coalesce_key or f"job:{env.record}"

    def _lease_key(self, env: Envelope) -> str:
        return self.keys.inflight(self._lease_of(env))

    async def _state(self, env: Envelope, wake: bool = False) -> tuple[str, list[Any]]:
        """What dedup makes of ``env``: answered, cached (with the answer), served (a hit recorded already, with
        its prepared answer), unrecorded (a hit prepared, to record), route, lead, own or wait. ``wake``: a
        waiter would be held, so the lease is flagged for its release to wake it."""
        lease_ttl_s = self.settings.leader_lease_s
        result_key = self.keys.result(env.record)
        shared = env.coalesce_key is not None and not env.coalesce_key.startswith("job:")
        lease_of = self._lease_of(env)
        leases = {"lease_key": self.keys.inflight(lease_of), "waiters_key": self.keys.waiters(lease_of)}
        if env.cache_key is not None and env.job.cache.mode == "use" and shared:
            ahead = self.one_trip.ahead(env, self._served) if self.one_trip is not None else None
            if ahead is not None and self.one_trip is not None:
                return await self.one_trip.serve(env, ahead, leases, wake)
            # Two slots (the job's, the cache entry's), one round trip: both go out together.
            answered, (state, *value) = await asyncio.gather(
                self.redis.exists(result_key),
                self._decide_cached(
                    keys={"cache_key": self.keys.cache(env.cache_key), **leases},
                    args={"job_id": env.record, "lease_ttl_s": lease_ttl_s, "wake": int(wake)},
                ),
            )
            # A lease taken for a job answered already is released by the account stage's replay.
            return ("answered", []) if answered else (as_text(state), value)
        args: dict[str, Scalar] = {
            "job_id": env.record,  # the lease owner
            "lease_ttl_s": lease_ttl_s,
            "coalesce": int(env.coalesce_key is not None),
            "wake": int(wake),
        }
        state, *value = await self._decide_own(keys={"result_key": result_key, **leases}, args=args)
        return as_text(state), value

    async def _decide(self, env: Envelope, delivery: Delivery) -> Handled:
        # Expected before the decide script flags the lease, so a release right after it cannot slip past.
        lease_key = self._lease_key(env)
        woken = self.waker.expect(lease_key) if env.coalesce_key is not None and self.waker.can_hold() else None
        try:
            state, value = await self._state(env, wake=woken is not None)
        except BaseException:
            self._drop(lease_key, woken)
            raise
        if not _waits(state, delivery):
            self._drop(lease_key, woken)
            return await self._act(state, value, env)
        waiting = env.model_copy(update={"waits": env.waits + 1})
        # A copy of the same job_id ("own") is not held: a crash would hand it back marked redelivered, which is
        # how a leader coming back looks, and it would make a second provider call beside the first.
        if state != "wait" or woken is None or self._batch_lane(env) or not self.waker.can_hold():
            self._drop(lease_key, woken)
            return self._park(waiting)
        self.waker.held += 1
        return Handled([], resume=partial(self._held, waiting, delivery, woken))

    def _drop(self, lease_key: str, woken: asyncio.Future[None] | None) -> None:
        if woken is not None:
            self.waker.forget(lease_key, woken)

    async def _act(self, state: str, value: list[Any], env: Envelope) -> Handled:
        """What a job that does not wait becomes: an answer (a replay, a hit) or the route stage's input."""
        if state == "answered":
            # A job_id already answered (a producer retry): its stored result is replayed.
            return await self._answer(env)
        if state in ("served", "unrecorded") and self.one_trip is not None:
            return await self.one_trip.answer(value[0], recorded=state == "served")
        if state == "cached":
            served = self._served(env, Outcome.model_validate_json(value[0]))
            if self.one_trip is not None and self.finish is not None:
                return await self.one_trip.record(served, value[0])
            return await self._answer(served)
        # A lease already ours: a redelivery of the leader goes on (see _waits).
        return Handled([envelope_publish(env, self.topo.route)])

    async def _held(self, env: Envelope, delivery: Delivery, woken: asyncio.Future[None]) -> Handled:
        """A waiter held here, outside the stage's slots, until the lease's release wakes it or a re-check is due;
        then decided again. It parks in the broker when held too long, when the stage stops or Redis is away, and
        is answered DeadlineExceeded once its deadline passes, as it would be back from the broker."""
        lease_key = self._lease_key(env)
        held_until = time.monotonic() + self.settings.coalesce_hold_s
        try:
            while True:
                await self._woken_or_due(woken, held_until, env.deadline_at)
                self.waker.forget(lease_key, woken)
                if self._hold_over(env, held_until):
                    return self._park(env)
                async with self.waker.deciding:
                    handled = await self._decided_again(env, delivery, lease_key, held_until)
                if isinstance(handled, Handled):
                    return handled
                woken = handled
        finally:
            self.waker.forget(lease_key, woken)  # however the hold ends (a cancellation included)
            self.waker.held -= 1

    async def _decided_again(
        self, env: Envelope, delivery: Delivery, lease_key: str, held_until: float
    ) -> Handled | asyncio.Future[None]:
        """A held waiter's next decision: what it becomes, or the future that wakes it when it waits on. Asked again
        after its turn came (a herd of woken waiters takes turns): the stage may be stopping by then, the hold or
        the deadline over."""
        if self._hold_over(env, held_until):
            return self._park(env)
        woken = self.waker.expect(lease_key)
        state, value = "park", list[Any]()
        try:
            state, value = await self._state(env, wake=True)
        except REDIS_DOWN:
            pass  # parked: the broker's timer re-checks it
        finally:
            if state != "wait":
                self.waker.forget(lease_key, woken)
        if state == "wait":
            return woken
        if state == "park" or _waits(state, delivery):
            return self._park(env)
        return await self._act(state, value, env)

    def _hold_over(self, env: Envelope, held_until: float) -> bool:
        """Whether a held waiter parks now (the stage stops, or it was held long enough); DeadlineExceeded once its
        deadline has passed, as it would be answered back from the broker."""
        if env.deadline_at is not None and self.clock() > env.deadline_at:
            raise DeadlineExceeded("the job passed its deadline_s while it waited for an identical job")
        return self.waker.draining or time.monotonic() >= held_until

    async def _woken_or_due(self, woken: asyncio.Future[None], held_until: float, deadline_at: float | None) -> None:
        """Until the wake, the next re-check, the end of the hold or the job's deadline, whichever comes first."""
        if self.waker.draining:
            return
        due_s = min(self.settings.coalesce_recheck_ms / 1000, held_until - time.monotonic())
        if deadline_at is not None:
            due_s = min(due_s, deadline_at - self.clock() + 0.001)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(woken, max(0.0, due_s))

    def _batch_lane(self, env: Envelope) -> bool:
        return price_lane(self.batch(), env.job, env.lane)[0] == "batch"

    def _park(self, waiting: Envelope) -> Handled:
        """A waiter to the broker's wait queue, back through recheck after its TTL. A waiter of a batch-lane job
        re-checks every few seconds, not ten times a second for hours."""
        queue = self.topo.waiting_batch if self._batch_lane(waiting) else self.topo.waiting
        return Handled([envelope_publish(waiting, queue)])

    async def _answer(self, env: Envelope) -> Handled:
        if self.finish is None:
            return Handled([envelope_publish(env, self.topo.account)])
        return await self.finish(env)

    def _served(self, env: Envelope, answer: Outcome) -> Envelope:
        status = "coalesced" if env.waits else "hit"
        return env.model_copy(update={"outcome": answer, "cache_status": status})


def _waits(state: str, delivery: Delivery) -> bool:
    """A job that waits for a leader: the lease is another's, or already its own while this delivery is not a
    redelivery (a second copy of the same job_id, a producer retry, waits for the first; a redelivered leader,
    back after a crash, goes on)."""
    return state == "wait" or (state == "own" and not delivery.redelivered)
