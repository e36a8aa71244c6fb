"""The batch worker of one provider: jobs the route stage sent to the batch lane (``<ns>.batch.<provider>``)
go into provider batches, one per model, through the provider's Batch API, and each answer goes on to the
account stage, which prices it at the batch rate.

Two parts in one process. The intake core (``BatchIntake``) writes each job into the open batch of its model
in Redis and only then lets the runtime ack it (farebox/stages/batch_store.py). The loop (``BatchLoop``)
seals a batch when it is full (the provider's limits on requests and bytes, or the policy's lower ones) or
has lingered ``batch.linger_s``, submits it, polls it with backoff and hands each line on: an answer to the
account stage; a line that failed to the synchronous lane (``batch.on_line_error``) or to its error; a line
that never ran (the batch expired, failed or was cancelled) to the synchronous lane while its deadline
allows, else a ``timeout`` error. A batch the provider refuses goes to the synchronous lane whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from redis.asyncio import Redis

from farebox import metrics
from farebox.errors import REDIS_DOWN, PermanentError, RetryableError
from farebox.providers.batch_types import BatchAdapter, BatchHandle, BatchLine, FindHint
from farebox.routing.auth import AuthPolicy, internal_sender
from farebox.routing.batch_lane import BatchPolicy
from farebox.schemas import Envelope
from farebox.settings import Settings
from farebox.stages.batch_onward import Ending, Went, batch_request, onward, submit_order, undecodable
from farebox.stages.batch_store import BatchStore, custom_id_of
from farebox.stages.decode import envelope_from_internal
from farebox.stages.stage import Delivery, EnvelopeStage, Handled, Publish

log = logging.getLogger("farebox.batch")

Publisher = Callable[[Publish], Awaitable[None]]
TICK_S = 0.5  # how often the loop looks at its batches (a full batch wakes it at once)
MAX_FAILURES = 6  # failures in a row of one batch (backing off) before its jobs go to the sync lane
HAND_ON_CHUNK = 200  # jobs published at once, then marked handed on


class BatchLane:
    """What the intake and the loop share: the provider, its adapter and store, each model's open batch."""

    def __init__(
        self,
        settings: Settings,
        provider: str,
        adapter: BatchAdapter,
        redis: Redis,
        policy: Callable[[], BatchPolicy],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.provider = provider
        self.adapter = adapter
        self.store = BatchStore(redis, settings.keys, provider)
        self.policy = policy
        self.clock = clock
        self.owner = f"{provider}-{uuid.uuid4().hex[:12]}"  # this worker, in the batches it claims
        self.topo = settings.topology
        # model -> the batch id now taking its jobs, and whether this worker made it and has not seen it created:
        # only such an id may be created by an add, so a finished batch's id never comes back as a new batch.
        self._open: dict[str, tuple[str, bool]] = {}
        self.wake = asyncio.Event()

    def open_batch(self, model: str, *, closed: str | None = None) -> tuple[str, bool]:
        """The open batch of ``model`` (and whether it is fresh); a new one when ``closed`` (the one last
        tried) no longer takes jobs."""
        current = self._open.get(model)
        if current is None or current[0] == closed:
            current = self._open[model] = (f"fb{uuid.uuid4().hex[:24]}", True)  # also its idempotency key
        return current

    def created(self, model: str, batch: str) -> None:
        if self._open.get(model) == (batch, True):
            self._open[model] = (batch, False)

    def closed(self, model: str, batch: str) -> None:
        if self._open.get(model, ("",))[0] == batch:
            del self._open[model]

    def limits(self) -> tuple[int, int]:
        """The most requests and bytes one batch may take: the provider's, or the policy's when lower."""
        policy = self.policy()
        requests = min(self.adapter.max_requests, policy.max_requests or self.adapter.max_requests)
        size = min(self.adapter.max_bytes, policy.max_bytes or self.adapter.max_bytes)
        return requests, size


class BatchIntake(EnvelopeStage):
    """Takes each job of ``<ns>.batch.<provider>`` into an open batch in Redis; the runtime acks it after."""

    name = "batch"

    def __init__(self, lane: BatchLane, auth: Callable[[], AuthPolicy] = AuthPolicy) -> None:
        self.lane = lane
        self.auth = auth
        self.settings = lane.settings
        self.account_queue = lane.topo.account

    def input_queues(self) -> Sequence[str]:
        return (self.lane.topo.batch(self.lane.provider),)

    def decode(self, delivery: Delivery) -> Envelope:
        return envelope_from_internal(delivery, internal_sender(self.auth(), self.settings.amqp_user))

    async def handle(self, env: Envelope, delivery: Delivery) -> Handled:
        route = env.route
        if route is None or route.price_lane != "batch" or route.provider != self.lane.provider:
            raise PermanentError("internal: a job reached the batch lane without a batch route to this provider")
        custom_id = custom_id_of(env.record)
        body = env.model_dump_json(exclude_defaults=True)
        batch: str | None = None
        limits = self.lane.limits()
        while True:
            batch, fresh = self.lane.open_batch(route.model, closed=batch)
            added = await self.lane.store.add(
                batch,
                route.model,
                custom_id,
                body,
                fresh=fresh,
                now=self.lane.clock(),
                owner=self.lane.owner,
                claim_s=self.settings.batch_claim_s,
                limits=limits,
            )
            if added.outcome != "closed":
                break
            self.lane.wake.set()  # a full batch is sealed now, not after its linger
        if added.outcome == "added":
            self.lane.created(route.model, batch)
        if env.coalesce_key is not None:  # a redelivery too: the first may have died before this
            await self.lane.store.hold_lease(env.coalesce_key, env.record)
        if added.outcome == "added" and (added.count >= limits[0] or added.size >= limits[1]):
            self.lane.closed(route.model, batch)  # full: the next job starts another
            self.lane.wake.set()
        return Handled([])

    async def beside(self, stop: asyncio.Event, publish: Publisher) -> None:
        """The loop, run by the runtime beside the consumer once it is ready."""
        await BatchLoop(self.lane, publish).run(stop)


class BatchLoop:
    def __init__(self, lane: BatchLane, publish: Publisher) -> None:
        self.lane = lane
        self.store = lane.store
        self.publish = publish

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick()
            except REDIS_DOWN as err:
                log.warning("batch %s: Redis away (%s); trying again", self.lane.provider, type(err).__name__)
            except Exception:  # the loop must outlive any one batch's surprise
                log.exception("batch %s: unexpected failure; trying again", self.lane.provider)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken(stop), TICK_S)

    async def _woken(self, stop: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(self.lane.wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            self.lane.wake.clear()

    async def tick(self) -> None:
        """One look at every batch of the provider this worker holds or may take over."""
        for batch in await self.store.live():
            now = self.lane.clock()
            if not await self.store.claim(batch, self.lane.owner, now=now, claim_s=self.lane.settings.batch_claim_s):
                continue
            meta = await self.store.meta(batch)
            try:
                async with self._holding(batch) as held:
                    try:
                        await self._advance(batch, meta, now, held)
                    except LostClaim:
                        raise
                    except REDIS_DOWN:
                        raise
                    except Exception as err:  # one batch's trouble must not stop the provider's other batches
                        await self._failed_once(batch, meta, now, err, held)
            except LostClaim:
                log.warning("batch %s %s: another worker took it over; leaving it", self.lane.provider, batch)
            except REDIS_DOWN:
                raise
            except Exception:  # even giving up failed: logged, tried again next tick, the other batches go on
                log.exception("batch %s %s: could not give the batch up; trying again", self.lane.provider, batch)

    async def _failed_once(self, batch: str, meta: dict[str, str], now: float, err: Exception, held: Held) -> None:
        """Try again later, with backoff; after MAX_FAILURES in a row, abandon the batch: no more jobs join it,
        its provider batch (if any) is cancelled, and its jobs go to the sync lane."""
        failures = int(meta.get("failures", "0")) + 1
        log.warning("batch %s %s: %s: %s (failure %d)", self.lane.provider, batch, type(err).__name__, err, failures)
        if failures < MAX_FAILURES:
            hint = err.retry_after_s if isinstance(err, RetryableError) else None
            wait = hint or min(self.lane.settings.batch_poll_max_s, self.lane.settings.batch_poll_first_s * 2**failures)
            await self.store.update(batch, self.lane.owner, {"failures": str(failures), "retry_at": repr(now + wait)})
            return
        state = meta.get("state", "open")
        if state != "abandoned" and not await self.store.move(batch, self.lane.owner, state, "abandoned"):  # type: ignore[arg-type]
            raise LostClaim(batch)
        metrics.PROVIDER_BATCHES.labels(self.lane.provider, "abandoned").inc()
        await self._abandon(batch, meta, held, why=f"the batch kept failing ({type(err).__name__})")

    async def _abandon(self, batch: str, meta: dict[str, str], held: Held, *, why: str) -> None:
        jobs = await self.store.jobs(batch)
        handle = BatchHandle.model_validate_json(meta["handle"]) if "handle" in meta else None
        if handle is None and meta.get("state") == "submitting":  # the create call may have gone out
            with contextlib.suppress(Exception):
                handle = await self.lane.adapter.find(batch, self._hint(meta, jobs, await self._taken()))
        if handle is not None:
            held.check()
            with contextlib.suppress(Exception):
                await self.lane.adapter.cancel(handle)
        await self._hand_on(batch, jobs, {}, self._ending(why=why), held)

    @contextlib.asynccontextmanager
    async def _holding(self, batch: str) -> AsyncIterator[Held]:
        """Renew the claim on ``batch`` while this worker works on it (an upload or a hand-on of thousands of
        jobs may take longer than the claim), so no other worker takes over a batch whose worker is alive; a
        claim lost all the same (another worker took it) is seen before each step with an effect (``check``)."""
        claim_s = self.lane.settings.batch_claim_s
        held = Held(batch)

        async def renew() -> None:
            while not held.lost:
                await asyncio.sleep(claim_s / 3)
                try:
                    held.lost = not await self.store.claim(
                        batch, self.lane.owner, now=self.lane.clock(), claim_s=claim_s
                    )
                except Exception as err:  # Redis away for a moment: try again; the claim lasts claim_s
                    log.warning("batch %s %s: claim not renewed (%s)", self.lane.provider, batch, type(err).__name__)

        task = asyncio.create_task(renew())
        try:
            yield held
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _advance(self, batch: str, meta: dict[str, str], now: float, held: Held) -> None:
        state, owner = meta.get("state"), self.lane.owner
        if state == "abandoned":  # a worker gave it up and died while handing its jobs on
            await self._abandon(batch, meta, held, why="the batch was abandoned")
            return
        if float(meta.get("retry_at", "0")) > now:
            return
        if state == "open" and self._ready_to_seal(meta, now):
            if await self.store.move(batch, owner, "open", "sealed"):
                self.lane.closed(meta.get("model", ""), batch)
                state = "sealed"
        if state == "sealed" and await self.store.move(
            batch, owner, "sealed", "submitting", submitting_at=repr(self.lane.clock())
        ):
            await self._submit(batch, {**meta, "submitting_at": repr(self.lane.clock())}, held, resumed=False)
        elif state == "submitting":  # this worker or a dead one sent the create call: did it arrive?
            await self._submit(batch, meta, held, resumed=True)
        elif state == "submitted" and float(meta.get("next_poll_at", "0")) <= now:
            await self._poll(batch, meta, now, held)

    def _ready_to_seal(self, meta: dict[str, str], now: float) -> bool:
        most_requests, most_bytes = self.lane.limits()
        lingered = now - float(meta.get("created_at", "0")) >= self.lane.policy().linger_s
        full = meta.get("full") == "1" or int(meta.get("count", "0")) >= most_requests
        return lingered or full or int(meta.get("bytes", "0")) >= most_bytes

    def _ending(self, handle: BatchHandle | None = None, why: str | None = None, since: float = 0.0) -> Ending:
        policy = self.lane.policy()
        return Ending(self.lane.provider, self.lane.topo, self.lane.clock(), policy.on_line_error, handle, why, since)

    async def _taken(self) -> frozenset[str]:
        """The provider batch ids the provider's live batches already hold (no other batch may be found as one)."""
        taken = set()
        for other in await self.store.live():
            raw = (await self.store.meta(other)).get("handle")
            if raw:
                taken.add(BatchHandle.model_validate_json(raw).batch_id)
        return frozenset(taken)

    @staticmethod
    def _hint(meta: dict[str, str], jobs: dict[str, str], taken: frozenset[str]) -> FindHint:
        return FindHint(created_after=float(meta.get("submitting_at", "0")), requests=len(jobs), taken=taken)

    async def _submit(self, batch: str, meta: dict[str, str], held: Held, *, resumed: bool) -> None:
        jobs = await self.store.jobs(batch)
        model = meta.get("model", "")
        if not jobs:
            if not await self.store.finish(batch, self.lane.owner):
                raise LostClaim(batch)
            return
        order = submit_order(jobs)
        handle = await self.lane.adapter.find(batch, self._hint(meta, jobs, await self._taken())) if resumed else None
        if handle is None:
            held.check()
            try:
                handle = await self.lane.adapter.submit(model, [batch_request(c, e) for c, e in order], batch)
            except PermanentError as err:  # refused: the jobs can still be answered synchronously
                log.warning("batch %s %s: the provider refused the batch (%s)", self.lane.provider, batch, err)
                metrics.PROVIDER_BATCHES.labels(self.lane.provider, "refused").inc()
                await self._hand_on(
                    batch, jobs, {}, self._ending(why=f"the provider refused the batch ({err.code})"), held
                )
                return
        else:  # found: our model name (the provider may say a dated snapshot) and, for Gemini, our line order
            ids = handle.custom_ids or tuple(cid for cid, _ in order)
            handle = handle.model_copy(update={"model": model, "custom_ids": ids})
        now = self.lane.clock()
        fields = {
            "handle": handle.model_dump_json(),
            "submitted_at": repr(now),
            "next_poll_at": repr(now + self.lane.settings.batch_poll_first_s),
        }
        if not await self.store.move(batch, self.lane.owner, "submitting", "submitted", polls="0", **fields):
            await self._cancel_unless_adopted(batch, handle)
            raise LostClaim(batch)
        metrics.PROVIDER_BATCHES.labels(self.lane.provider, "submitted").inc()
        log.info("batch %s %s: submitted %d job(s) as %s", self.lane.provider, batch, len(jobs), handle.batch_id)

    async def _cancel_unless_adopted(self, batch: str, handle: BatchHandle) -> None:
        """Another worker took the batch over meanwhile: cancel our provider batch, a second copy, unless that
        worker found it and took it as its own."""
        kept = (await self.store.meta(batch)).get("handle")
        if kept and BatchHandle.model_validate_json(kept).batch_id == handle.batch_id:
            return
        with contextlib.suppress(Exception):
            await self.lane.adapter.cancel(handle)

    async def _poll(self, batch: str, meta: dict[str, str], now: float, held: Held) -> None:
        handle = BatchHandle.model_validate_json(meta["handle"])
        status = await self.lane.adapter.poll(handle)
        if not status.ended:
            polls = int(meta.get("polls", "0")) + 1
            settings = self.lane.settings
            wait = min(settings.batch_poll_max_s, settings.batch_poll_first_s * 1.5**polls)
            fields = {"polls": str(polls), "next_poll_at": repr(now + wait), "failures": "0"}
            if not await self.store.update(batch, self.lane.owner, fields):
                raise LostClaim(batch)
            return
        lines = {line.custom_id: line for line in await self.lane.adapter.results(handle)}
        jobs = await self.store.jobs(batch)
        why = None if status.state == "ended" else f"batch {handle.batch_id} {status.state}"
        ending = self._ending(handle, why, float(meta.get("submitted_at", now)))
        await self._hand_on(batch, jobs, lines, ending, held)
        metrics.PROVIDER_BATCHES.labels(self.lane.provider, status.state).inc()
        log.info("batch %s %s: %s, %d job(s) handed on", self.lane.provider, batch, status.state, len(jobs))

    async def _hand_on(
        self, batch: str, jobs: dict[str, str], lines: dict[str, BatchLine], ending: Ending, held: Held
    ) -> None:
        """Publish every job's next message, a chunk at a time, marking each chunk handed on; then the batch
        is finished. A worker that dies half way hands on only the rest (the account stage drops a repeat)."""
        items = list(jobs.items())
        for start in range(0, len(items), HAND_ON_CHUNK):
            chunk = items[start : start + HAND_ON_CHUNK]
            nexts = [self._next(cid, raw, lines.get(cid), ending) for cid, raw in chunk]
            held.check()
            await asyncio.gather(*(self.publish(p) for p, _ in nexts))
            for _, went in nexts:
                metrics.child(metrics.BATCH_LANE_JOBS, self.lane.provider, went).inc()
            if not await self.store.handed_on(batch, self.lane.owner, [cid for cid, _ in chunk]):
                raise LostClaim(batch)
        if not await self.store.finish(batch, self.lane.owner):
            raise LostClaim(batch)

    @staticmethod
    def _next(custom_id: str, raw: str, line: BatchLine | None, ending: Ending) -> tuple[Publish, Went]:
        try:
            env = Envelope.model_validate_json(raw)
        except ValueError:  # pydantic's ValidationError is one
            return undecodable(custom_id, raw, ending.topo)
        return onward(env, line, ending)


class Held:
    """A batch this worker works on; ``lost`` once another worker has taken it over."""

    def __init__(self, batch: str) -> None:
        self.batch = batch
        self.lost = False

    def check(self) -> None:
        if self.lost:
            raise LostClaim(self.batch)


class LostClaim(Exception):
    """Another worker holds the batch now (this one's claim lapsed): leave it to that worker."""
