"""Answers dead letters: every message dead-lettered (undecodable, or over the delivery limit) reaches
``<ns>.dead.notify``; this stage gives its caller a typed error result and the job its one ledger entry,
frees a coalescing lease it held so waiters take over, and writes a record of it to ``<ns>.dead`` for people
to inspect: why, from where, when, its size and sha256, its job_id and tenant. Not its body, which may hold
prompts and secrets, unless ``dead_keep_bodies`` asks. The record is published with confirms before the
input is acked, like the answer, so a crash loses neither.

A producer's body (one refused at the intake) is trusted with nothing an internal envelope carries (lease,
budgets, route, where to answer), and acts for a tenant only as the policy's ``auth`` lets its sender: a
refused one gets ``forbidden`` and no ledger entry, since its job_id may be another tenant's job, whose
stored result must not be replayed to it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

from pydantic import ValidationError
from redis.asyncio import Redis

from farebox.constants import H_CODE, H_REASON, H_STAGE, H_USER, INTERACTIVE, as_text
from farebox.errors import ERROR_CODES, FareboxError, Forbidden
from farebox.routing.auth import AuthPolicy, acting_tenant, internal_sender
from farebox.schemas import BudgetHold, Envelope, ErrorInfo, FeedbackReceipt, JobResult, RouteInfo
from farebox.schemas.job import TENANT_PATTERN
from farebox.settings import Settings
from farebox.stages.account import Recorder, Recording, result_publish
from farebox.stages.feedback import receipt_publish
from farebox.stages.messages import H_SENT_AT, H_SOURCE_QUEUE
from farebox.stages.stage import Delivery, Handled, Publish


@dataclass(frozen=True)
class Origin:
    """What a dead letter's record says besides its job: never the body itself."""

    reason: str
    code: str
    stage: str | None  # the stage that refused it; None when the broker dead-lettered it
    queue: str | None  # the queue it was refused from, when known
    user_id: str | None  # its sender's RabbitMQ user, which RabbitMQ checked
    size: int  # of the body, in bytes
    sha256: str  # of the body: the same body twice is seen as such, and a kept copy can be matched
    sent_at: float | None
    dead_at: float | None


@dataclass(frozen=True)
class DeadLetter:
    job_id: str
    tenant: str
    code: str
    reason: str
    reply_to: str | None
    correlation_id: str | None
    lease_key: str | None
    metadata: dict[str, Any]
    budgets: tuple[BudgetHold, ...] = ()  # a reservation the dead job still holds
    route: RouteInfo | None = None  # how it was routed, so a failed experiment job still counts in its arm
    origin: Origin | None = None
    producer: bool = False  # a producer's body: it acts for a tenant only as its sender may
    tenant_named: bool = False  # a producer's body named its tenant


def _first_death(headers: dict[str, Any]) -> dict[str, Any] | None:
    deaths = headers.get("x-death")
    return deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else None


def _death_reason(headers: dict[str, Any]) -> str:
    first = _first_death(headers)
    if first is not None:
        reason, queue = as_text(first.get("reason", b"")), as_text(first.get("queue", b""))
        if reason == "delivery_limit":
            return (
                f"the job failed repeatedly in {queue} and hit the delivery limit; "
                f"it is kept in the dead-letter queue for inspection"
            )
        return f"dead-lettered from {queue} ({reason})"
    return "dead-lettered"


def read_origin(delivery: Delivery, pipeline_user: str) -> Origin:
    """Where ``delivery`` was refused and by whom it was sent. A dead letter the pipeline published itself
    names its sender in a header, trusted only on a message RabbitMQ checked came from the pipeline's own
    user (anyone who may publish to the default exchange can put a message in the notify queue); one the
    broker dead-lettered (it has ``x-death``) keeps the original message, its user_id property included."""
    headers = dict(delivery.headers)
    death = _first_death(headers)
    stage = _header(headers.get(H_STAGE))
    ours = death is None and stage is not None and delivery.user_id == pipeline_user
    if ours:
        user, queue = _header(headers.get(H_USER)), _header(headers.get(H_SOURCE_QUEUE))
        sent = headers.get(H_SENT_AT)
        sent_at, dead_at = (float(sent) if isinstance(sent, int | float) else None), delivery.timestamp
    else:
        user, queue = delivery.user_id, _header(death.get("queue")) if death else None
        sent_at, dead_at = delivery.timestamp, _seconds(death.get("time")) if death else None
    code = _header(headers.get(H_CODE))
    return Origin(
        reason=(_header(headers.get(H_REASON)) or _death_reason(headers))[:500],
        code=code if code in ERROR_CODES else "internal",
        stage=stage if ours else None,
        queue=queue,
        user_id=user or None,
        size=len(delivery.body),
        sha256=hashlib.sha256(delivery.body).hexdigest(),
        sent_at=sent_at,
        dead_at=dead_at,
    )


def _seconds(value: object) -> float | None:
    if isinstance(value, datetime):  # an AMQP timestamp: UTC, whole seconds
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    return float(value) if isinstance(value, int | float) else None


@dataclass(frozen=True)
class DeadFeedback:
    """A feedback message that was refused: no job, no ledger entry; its sender gets an error receipt."""

    job_id: str
    code: str
    reason: str
    origin: Origin | None = None


def dead_feedback(delivery: Delivery, feedback_queue: str, origin: Origin | None = None) -> DeadFeedback | None:
    """The feedback message ``delivery`` holds, when it was dead-lettered from the feedback queue."""
    headers = dict(delivery.headers)
    death = _first_death(headers)
    queue = death.get("queue") if death is not None else None
    if _header(headers.get(H_STAGE)) != "feedback" and _header(queue) != feedback_queue:
        return None
    job_id = None
    try:
        data = json.loads(delivery.body)
        job_id = _text(data.get("job_id")) if isinstance(data, dict) else None
    except (ValueError, RecursionError):
        pass
    code = _header(headers.get(H_CODE)) or "internal"
    return DeadFeedback(
        job_id=(job_id or "")[:200],
        code=code if code in ERROR_CODES else "internal",
        reason=_header(headers.get(H_REASON)) or _death_reason(headers),
        origin=origin,
    )


def _header(value: object) -> str | None:
    return as_text(value) if isinstance(value, (bytes, str)) else None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


class _Claims(NamedTuple):
    """What a body that is not a valid envelope says of itself, unchecked."""

    job_id: str | None = None
    tenant: str | None = None
    tenant_named: bool = False
    reply_to: str | None = None
    correlation_id: str | None = None


def read_dead_letter(
    delivery: Delivery, origin: Origin, *, intake: str, max_body_bytes: int, foreign: bool = False
) -> DeadLetter:
    """Best effort: whatever the body is (garbage included), produce a typed error to answer. What came
    from the intake is a producer's body even when it looks like an envelope: a forged one must not release
    another job's lease or budget. So is a body of unknown origin that is not a valid envelope, and, with
    ``foreign`` (auth mode user_id and a sender other than the pipeline), or refused as foreign by a stage
    (code forbidden), any body."""
    from_intake = origin.queue in (intake, intake + INTERACTIVE)  # the intake of either lane
    untrusted = from_intake or foreign or origin.code == "forbidden"
    env = None if untrusted else _envelope(delivery.body)
    if env is not None:
        return DeadLetter(
            job_id=env.job_id[:200],
            tenant=env.job.tenant[:64],
            code=origin.code,
            reason=origin.reason,
            # A job from a batch message has no properties of its own: its envelope knows the caller.
            reply_to=env.reply_to or delivery.reply_to or None,
            correlation_id=env.correlation_id or delivery.correlation_id,
            lease_key=env.coalesce_key,
            metadata=env.job.metadata,
            budgets=env.budgets,
            route=RouteInfo(reason=env.route.reason, candidates=env.route.candidates, strategy=env.route.strategy)
            if env.route is not None
            else None,
            origin=origin,
        )
    producer = untrusted or origin.queue is None
    # An oversized producer's body is not read here either (the intake refused it unread).
    readable = not (producer and len(delivery.body) > max_body_bytes)
    claims = _claims(delivery, producer) if readable else _Claims()
    # Deterministic, so a redelivered dead letter is still recorded only once.
    job_id = claims.job_id or delivery.message_id or "invalid-" + origin.sha256[:24]
    return DeadLetter(
        job_id=job_id[:200],
        tenant=(claims.tenant or "default")[:64],
        code=origin.code,
        reason=origin.reason,
        reply_to=claims.reply_to or delivery.reply_to or None,
        correlation_id=claims.correlation_id or delivery.correlation_id,
        lease_key=None,
        metadata={},
        origin=origin,
        producer=producer,
        tenant_named=claims.tenant_named,
    )


def _envelope(body: bytes) -> Envelope | None:
    try:
        return Envelope.model_validate_json(body)
    except (ValidationError, ValueError):
        return None


def _claims(delivery: Delivery, producer: bool) -> _Claims:
    try:
        data = json.loads(delivery.body)
    except (ValueError, RecursionError):
        return _Claims()
    if not isinstance(data, dict):
        return _Claims()
    job_id, job = _text(data.get("job_id")), data.get("job")
    if producer:  # where to answer is its message property, never its body
        claimed = _tenant_name(data.get("tenant"))
        return _Claims(job_id, claimed, claimed is not None)
    tenant = _tenant_name(data.get("tenant")) or (_tenant_name(job.get("tenant")) if isinstance(job, dict) else None)
    if isinstance(job, dict) and "received_at" in data:
        # An envelope that no longer validates (a job of a batch has no properties of its own).
        return _Claims(job_id, tenant, False, _text(data.get("reply_to")), _text(data.get("correlation_id")))
    return _Claims(job_id, tenant)


def _tenant_name(value: object) -> str | None:
    """A claimed tenant that could be a tenant's name, else None (the body names none): a claim such as
    "victim/v" would spell another tenant's record (see schemas.job.TENANT_PATTERN)."""
    text = _text(value)
    return text if text is not None and len(text) <= 64 and re.fullmatch(TENANT_PATTERN, text) else None


def record_publish(
    settings: Settings, origin: Origin, body: bytes, *, job_id: str | None, tenant: str | None, answer: str, now: float
) -> Publish:
    """The record of a dead letter in ``<ns>.dead``, its raw body only when ``dead_keep_bodies`` asks."""
    record: dict[str, Any] = {
        "kind": "dead_letter",
        "reason": origin.reason,
        "code": origin.code,
        "answer": answer,  # the error code its caller got
        "stage": origin.stage,
        "queue": origin.queue,
        "job_id": job_id,
        "tenant": tenant,
        "user_id": origin.user_id,
        "body_bytes": origin.size,
        "body_sha256": origin.sha256,
        "sent_at": origin.sent_at,
        "dead_lettered_at": origin.dead_at,
        "recorded_at": round(now, 3),
    }
    if settings.dead_keep_bodies:
        try:
            record["body"] = body.decode()
        except UnicodeDecodeError:
            record["body_base64"] = base64.b64encode(body).decode()
    headers = {H_REASON: origin.reason, H_CODE: origin.code, **({H_STAGE: origin.stage} if origin.stage else {})}
    return Publish(
        routing_key=settings.topology.dead,
        body=json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode(),
        headers=headers,
        message_id=job_id,
        # Not mandatory: with <ns>.dead deleted by hand, callers are still answered (it comes back with the
        # next worker start); a mandatory publish would fail every dead letter until then.
        mandatory=False,
    )


class DeadLetterStage:
    name = "deadletter"

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        clock: Callable[[], float] = time.time,
        auth: Callable[[], AuthPolicy] = AuthPolicy,
    ) -> None:
        self.settings = settings
        self.topo = settings.topology
        self.clock = clock
        self.auth = auth  # the policy's auth in force
        self.recorder = Recorder(settings, redis, self.name, clock)

    def input_queues(self) -> Sequence[str]:
        return (self.topo.dead_notify,)

    def decode(self, delivery: Delivery) -> DeadLetter | DeadFeedback:
        origin = read_origin(delivery, self.settings.amqp_user)
        # In auth mode user_id, a dead letter the pipeline did not send (nor the broker dead-letter from a message
        # the pipeline sent) may be a producer's forgery published straight to the notify queue.
        sender = internal_sender(self.auth(), self.settings.amqp_user)
        foreign = sender is not None and delivery.user_id != sender
        return dead_feedback(delivery, self.topo.feedback, origin) or read_dead_letter(
            delivery, origin, intake=self.topo.intake, max_body_bytes=self.settings.max_body_bytes, foreign=foreign
        )

    def fail(self, item: object, err: FareboxError) -> Handled:
        return Handled([])

    async def handle(self, item: DeadLetter | DeadFeedback, delivery: Delivery) -> Handled:
        origin = item.origin or read_origin(delivery, self.settings.amqp_user)
        if isinstance(item, DeadFeedback):
            record = self._record(origin, delivery, item.job_id or None, None, item.code)
            error = ErrorInfo(code=item.code, message=item.reason)
            receipt = receipt_publish(FeedbackReceipt(job_id=item.job_id, status="error", error=error), delivery)
            return Handled([record, *receipt])
        if item.producer and item.code == "forbidden":  # refused as foreign by a stage: nothing is recorded
            return self._refuse(item, origin, Forbidden(item.reason), delivery)
        if item.producer:
            try:
                tenant = acting_tenant(self.auth(), origin.user_id, item.tenant, item.tenant_named)
            except Forbidden as err:
                return self._refuse(item, origin, err, delivery)
            item = replace(item, tenant=tenant[:64])
        record = self._record(origin, delivery, item.job_id, item.tenant, item.code)
        result = JobResult(
            job_id=item.job_id,
            tenant=item.tenant,
            status="error",
            metadata=item.metadata,
            error=ErrorInfo(code=item.code, message=item.reason),
            route=item.route,
        )
        handled = await self.recorder.record_and_reply(
            Recording(
                result=result,
                lease_key=item.lease_key,
                reply_to=item.reply_to,
                correlation_id=item.correlation_id,
                budgets=item.budgets,
            )
        )
        # The record first: a caller who has its answer finds the record already there.
        return replace(handled, publishes=[record, *handled.publishes])

    def _refuse(self, item: DeadLetter, origin: Origin, err: Forbidden, delivery: Delivery) -> Handled:
        # Answered here, with no ledger entry (as DedupStage.fail): the job_id of a message that may not act for
        # its tenant cannot key a record (it may be another tenant's job's id, whose stored result must not be
        # replayed to it).
        message = str(err) if str(err) == item.reason else f"{err} (the message was also refused: {item.reason})"
        result = JobResult(
            job_id=item.job_id, tenant=item.tenant, status="error", error=ErrorInfo(code=err.code, message=message)
        )
        reply = result_publish(result.model_dump_json().encode(), item.reply_to, item.correlation_id, item.job_id)
        return Handled([self._record(origin, delivery, item.job_id, item.tenant, err.code), *reply])

    def _record(
        self, origin: Origin, delivery: Delivery, job_id: str | None, tenant: str | None, answer: str
    ) -> Publish:
        return record_publish(
            self.settings, origin, delivery.body, job_id=job_id, tenant=tenant, answer=answer, now=self.clock()
        )
