"""Feedback stage: attach a quality score to a finished job's ledger entry, once per source.

A producer publishes a Feedback (schemas/feedback.py) to ``<ns>.feedback``. One Lua script, in the job's Redis
Cluster slot, checks that the job is in the ledger and belongs to the feedback's tenant and keeps the score
under the job (a later score from the same source replaces the earlier one). A second, in the ledger's slot,
indexes the job for ``farebox feedback export`` and folds the score into the experiment arm's aggregates for
the job's day. The fold is kept beside the aggregates (which score of each job and source they hold), so a
replacement adjusts the sums instead of adding a second score, and a redelivery (after a crash between the two
scripts too) folds in only what is not there yet: nothing is counted twice or lost. A malformed message, a
job the ledger does not have and another tenant's job are dead-lettered with their reason (the dead-letter
stage sends the typed error receipt to ``reply_to``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis

from farebox import metrics
from farebox.constants import JobRecord, as_text, job_record
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

_ATTACH_LAYOUT = Layout(keys=("entry_key", "feedback_key"), args=("tenant", "source", "record_json", "keep_s"))
_ATTACH = """
local entry = redis.call('GET', entry_key)
if not entry then return {'unknown'} end
local e = cjson.decode(entry)
if e['tenant'] ~= tenant then return {'forbidden'} end  -- the keys are the tenant's: a safety net
local old = redis.call('HGET', feedback_key, source)
redis.call('HSET', feedback_key, source, record_json)
redis.call('EXPIRE', feedback_key, keep_s)
local experiment, arm = e['experiment'], e['arm']
if type(experiment) ~= 'string' or type(arm) ~= 'string' then
  experiment, arm = '', ''
end
return {old and 'replaced' or 'added', experiment, arm, e['day'], old or ''}
"""

# ``folded_key`` holds, per "record|source", the score the arm's sums hold now and its time ("score ts"): a
# score older than that one (feedback handled out of order) is not folded over it.
_INDEX_LAYOUT = Layout(
    keys=("jobs_key", "arms_key", "folded_key"),
    args=("record", "ts", "keep_s", "fold", "arm_field", "folded_field", "score", "expires_at", "prior"),
)
_INDEX = """
redis.call('ZADD', jobs_key, ts, record)
redis.call('ZREMRANGEBYSCORE', jobs_key, '-inf', tonumber(ts) - tonumber(keep_s))
if fold ~= '1' then return 0 end
local was = redis.call('HGET', folded_key, folded_field)
local o = 0
if was then
  local old_score, old_ts = string.match(was, '^(%S+) (%S+)$')
  if tonumber(old_ts) > tonumber(ts) then return 0 end
  o = tonumber(old_score)
elseif prior ~= '' then
  o = tonumber(prior)  -- a score a farebox before the split kept: the arm's sums hold it already
else
  redis.call('HINCRBY', arms_key, arm_field .. 'n', 1)
end
local s = tonumber(score)
redis.call('HINCRBYFLOAT', arms_key, arm_field .. 'sum', s - o)
redis.call('HINCRBYFLOAT', arms_key, arm_field .. 'sumsq', s * s - o * o)
redis.call('HSET', folded_key, folded_field, score .. ' ' .. ts)
redis.call('EXPIREAT', arms_key, expires_at)
redis.call('EXPIREAT', folded_key, expires_at)
return 1
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


def _folded_before_the_split(old: str) -> str:
    """The score a replaced record holds when a farebox before the split folded it into the arm's sums in the
    attach itself (its record has no ``v``, moved by ``farebox keys upgrade``), else ""."""
    if not old:
        return ""
    with contextlib.suppress(ValueError, TypeError, KeyError):
        record = json.loads(old)
        if "v" not in record:
            return repr(float(record["score"]))
    return ""


class FeedbackStage:
    name = "feedback"

    def __init__(
        self, settings: Settings, store: CatalogStore, redis: Redis, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self.store = store
        self.keys = settings.keys
        self.clock = clock
        self._attach_script = NamedScript(redis, _ATTACH_LAYOUT, _ATTACH, "feedback attach")
        self._index_script = NamedScript(redis, _INDEX_LAYOUT, _INDEX, "feedback index")
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
        record = {"score": fb.value, "label": fb.label, "reference": fb.reference, "ts": round(now, 3), "v": 2}
        job = job_record(fb.tenant, fb.job_id)
        # Feedback lives as long as its job's ledger entry; the day's arm aggregates as the ledger's.
        attach: dict[str, Scalar] = {
            "tenant": fb.tenant,
            "source": fb.source,
            "record_json": json.dumps(record, ensure_ascii=False, separators=(",", ":")),
            "keep_s": self.settings.ledger_entry_keep_s,
        }
        keys = {"entry_key": self.keys.ledger_entry(job), "feedback_key": self.keys.feedback(job)}
        reply = [as_text(v) for v in await self._retrying(lambda: self._attach_script(keys=keys, args=attach))]
        verdict, experiment, arm, day, old = [*reply, "", "", "", ""][:5]
        if verdict in ("added", "replaced"):
            prior = _folded_before_the_split(old)
            await self._retrying(lambda: self._index(job, fb, now, experiment, arm, day, prior))
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

    def _index(self, job: JobRecord, fb: Feedback, now: float, experiment: str, arm: str, day: str, prior: str) -> Any:
        """Index the job for the export and fold its score into its arm's sums (an experiment job's only)."""
        # Kept days_kept days after today's end: at least as long as the job's day (feedback comes after the job).
        expires_at = (int(now) // 86_400 + 1 + self.settings.ledger_days_kept) * 86_400
        args: dict[str, Scalar] = {
            "record": job,
            "ts": now,
            "keep_s": self.settings.ledger_entry_keep_s,
            "fold": int(bool(experiment and day)),
            "arm_field": f"{experiment}|{arm}|{fb.source}|",
            "folded_field": f"{job}|{fb.source}",
            "score": repr(fb.value),
            "expires_at": expires_at,
            "prior": prior,
        }
        keys = {
            "jobs_key": self.keys.feedback_jobs,
            "arms_key": self.keys.feedback_arms(day or "-"),
            "folded_key": self.keys.feedback_folded(day or "-"),
        }
        return self._index_script(keys=keys, args=args)

    async def _retrying(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """``call()``, holding the message while Redis is away (as the account stage holds its ledger write):
        requeueing would spend the delivery limit and dead-letter good feedback in a short outage."""
        delay = 0.2
        while True:
            try:
                reply = await call()
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
