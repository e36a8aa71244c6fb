"""Feedback stage: attach a quality score to a finished job's ledger entry, once per source.

A producer publishes a Feedback (schemas/feedback.py) to ``<ns>.feedback``. One Lua script checks that the job
is in the ledger and belongs to the feedback's tenant, keeps the score under the job (a later score from the
same source replaces the earlier one), and folds it into the experiment arm's aggregates for the job's day:
a replacement adjusts the sums instead of adding a second score, and a redelivery replaces a score with itself,
so nothing is counted twice. A malformed message, a job the ledger does not have and another tenant's job are
dead-lettered with their reason (the dead-letter stage sends the typed error receipt to ``reply_to``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import ValidationError
from redis.asyncio import Redis

from farebox import metrics
from farebox.constants import as_text, job_record
from farebox.errors import REDIS_DOWN, FareboxError, Forbidden, InvalidRequest, describe_validation_error
from farebox.routing.auth import acting_tenant
from farebox.routing.store import CatalogStore
from farebox.schemas import Feedback, FeedbackReceipt
from farebox.settings import Settings
from farebox.stages.lua import Layout, NamedScript, Scalar
from farebox.stages.messages import dead_letter_publish
from farebox.stages.redis_health import RedisHealth
from farebox.stages.stage import Delivery, Handled, Publish

MAX_FEEDBACK_BYTES = 64 * 1024
REDIS_RETRY_MAX_S = 5.0

_LAYOUT = Layout(
    keys=("entry_key", "feedback_key", "jobs_key"),
    args=("record", "tenant", "source", "record_json", "score", "ts", "arms_prefix", "keep_s", "days_kept"),
)
_ATTACH = """
local entry = redis.call('GET', entry_key)
if not entry then return {'unknown'} end
local e = cjson.decode(entry)
if e['tenant'] ~= tenant then return {'forbidden'} end  -- the keys are the tenant's: a safety net
local old = redis.call('HGET', feedback_key, source)
redis.call('HSET', feedback_key, source, record_json)
redis.call('EXPIRE', feedback_key, keep_s)
redis.call('ZADD', jobs_key, ts, record)
redis.call('ZREMRANGEBYSCORE', jobs_key, '-inf', tonumber(ts) - tonumber(keep_s))
local experiment, arm = e['experiment'], e['arm']
if type(experiment) == 'string' and type(arm) == 'string' then
  local arms_key = arms_prefix .. e['day']
  local f = experiment .. '|' .. arm .. '|' .. source .. '|'
  local s = tonumber(score)
  local o = 0
  if old then
    o = tonumber(cjson.decode(old)['score'])
  else
    redis.call('HINCRBY', arms_key, f .. 'n', 1)
  end
  redis.call('HINCRBYFLOAT', arms_key, f .. 'sum', s - o)
  redis.call('HINCRBYFLOAT', arms_key, f .. 'sumsq', s * s - o * o)
  -- Kept days_kept days after today's end: at least as long as the job's day (feedback comes after the job).
  redis.call('EXPIREAT', arms_key, (math.floor(tonumber(ts) / 86400) + 1 + tonumber(days_kept)) * 86400)
else
  experiment, arm = '', ''
end
return {old and 'replaced' or 'added', experiment, arm}
"""


@dataclass(frozen=True)
class FeedbackItem:
    feedback: Feedback
    delivery: Delivery  # kept so that a refusal dead-letters the message as it came


def parse_feedback(body: bytes) -> Feedback:
    if len(body) > MAX_FEEDBACK_BYTES:
        raise InvalidRequest(f"feedback message is {len(body)} bytes; the limit is {MAX_FEEDBACK_BYTES}")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InvalidRequest("feedback body is not UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"feedback body must be a JSON object, got {type(data).__name__}")
    try:
        return Feedback.model_validate(data)
    except ValidationError as err:
        raise InvalidRequest("invalid feedback: " + describe_validation_error(err)) from None


def receipt_publish(receipt: FeedbackReceipt, delivery: Delivery) -> list[Publish]:
    if not delivery.reply_to:
        return []
    body = receipt.model_dump_json(exclude_none=True).encode()
    return [Publish(delivery.reply_to, body, correlation_id=delivery.correlation_id, caller_reply=True)]


class FeedbackStage:
    name = "feedback"

    def __init__(
        self, settings: Settings, store: CatalogStore, redis: Redis, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self.store = store
        self.keys = settings.keys
        self.clock = clock
        self._script = NamedScript(redis, _LAYOUT, _ATTACH)
        self.health = RedisHealth(self.name)

    def input_queues(self) -> Sequence[str]:
        return (self.settings.topology.feedback,)

    def decode(self, delivery: Delivery) -> FeedbackItem:
        return FeedbackItem(parse_feedback(delivery.body), delivery)

    def fail(self, item: object, err: FareboxError) -> Handled:
        assert isinstance(item, FeedbackItem)
        return Handled([dead_letter_publish(self.settings, item.delivery, self.name, err)])

    async def handle(self, item: FeedbackItem, delivery: Delivery) -> Handled:
        fb = item.feedback
        policy = self.store.current()[1]
        tenant = fb.tenant
        if delivery.user_id != self.settings.amqp_user:  # the pipeline's own grades carry their job's tenant
            tenant = acting_tenant(policy.auth, delivery.user_id, fb.tenant, "tenant" in fb.model_fields_set)
        if tenant != fb.tenant:
            fb = fb.model_copy(update={"tenant": tenant})
        now = self.clock()
        record = {"score": fb.value, "label": fb.label, "reference": fb.reference, "ts": round(now, 3)}
        job = job_record(fb.tenant, fb.job_id)
        args: dict[str, Scalar] = {
            "record": job,
            "tenant": fb.tenant,
            "source": fb.source,
            "record_json": json.dumps(record, ensure_ascii=False, separators=(",", ":")),
            "score": repr(fb.value),
            "ts": now,
            "arms_prefix": self.keys.feedback_arms(""),
            # Feedback lives as long as its job's ledger entry; the day's arm aggregates as the ledger's.
            "keep_s": self.settings.ledger_entry_keep_s,
            "days_kept": self.settings.ledger_days_kept,
        }
        keys = {
            "entry_key": self.keys.ledger_entry(job),
            "feedback_key": self.keys.feedback(job),
            "jobs_key": self.keys.feedback_jobs,
        }
        reply = [as_text(v) for v in await self._attach(keys, args)]
        verdict, experiment, arm = [*reply, "", ""][:3]
        if verdict == "unknown":
            raise InvalidRequest(
                f"no finished job {fb.job_id!r} of tenant {fb.tenant!r} in the ledger: feedback is for jobs that "
                "have their result"
            )
        if verdict == "forbidden":
            raise Forbidden(f"job {fb.job_id!r} is not one of tenant {fb.tenant!r}'s jobs; its feedback is refused")
        if verdict == "added":  # a replacement or a redelivery is not a second score
            self._observe(fb, experiment or "-", arm or "-", policy.feedback_sources)
        receipt = FeedbackReceipt(job_id=fb.job_id, status="ok", source=fb.source, replaced=verdict == "replaced")
        return Handled(receipt_publish(receipt, delivery))

    async def _attach(self, keys: dict[str, str], args: dict[str, Scalar]) -> list[bytes | str]:
        """Run the script, holding the message while Redis is away (as the account stage holds its ledger
        write): requeueing would spend the delivery limit and dead-letter good feedback in a short outage."""
        delay = 0.2
        while True:
            try:
                reply: list[bytes | str] = await self._script(keys=keys, args=args)
                self.health.ok()
                return reply
            except REDIS_DOWN as err:
                self.health.down(err)
                await asyncio.sleep(delay)
                delay = min(delay * 2, REDIS_RETRY_MAX_S)

    def _observe(self, fb: Feedback, experiment: str, arm: str, sources: tuple[str, ...]) -> None:
        source = fb.source if fb.source in sources else "other"
        metrics.child(metrics.FEEDBACK, experiment, arm, source).inc()
        metrics.child(metrics.FEEDBACK_SCORE, experiment, arm, source).inc(fb.value)
