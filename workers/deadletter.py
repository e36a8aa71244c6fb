"""Answers dead letters: every message dead-lettered (undecodable, or over the delivery limit)
reaches ``<ns>.dead.notify`` as a copy; this stage gives its caller a typed error result and the
job its one ledger entry, and frees a coalescing lease it held so waiters take over. The original
stays in ``<ns>.dead`` for people to inspect.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis

from farebox.constants import H_CODE, H_REASON, H_STAGE, as_text
from farebox.errors import ERROR_CODES, FareboxError
from farebox.schemas import BudgetHold, Envelope, ErrorInfo, FeedbackReceipt, JobResult, RouteInfo
from farebox.settings import Settings
from farebox.stages.account import Recorder, Recording
from farebox.stages.feedback import receipt_publish
from farebox.stages.stage import Delivery, Handled


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
    reserved_usd: float = 0.0
    route: RouteInfo | None = None  # how it was routed, so a failed experiment job still counts in its arm


def _death_reason(headers: dict[str, Any]) -> str:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        first = deaths[0]
        reason, queue = as_text(first.get("reason", b"")), as_text(first.get("queue", b""))
        if reason == "delivery_limit":
            return (
                f"the job failed repeatedly in {queue} and hit the delivery limit; "
                f"it is kept in the dead-letter queue for inspection"
            )
        return f"dead-lettered from {queue} ({reason})"
    return "dead-lettered"


@dataclass(frozen=True)
class DeadFeedback:
    """A feedback message that was refused: no job, no ledger entry; its sender gets an error receipt."""

    job_id: str
    code: str
    reason: str


def dead_feedback(delivery: Delivery, feedback_queue: str) -> DeadFeedback | None:
    """The feedback message ``delivery`` holds, when it was dead-lettered from the feedback queue."""
    headers = dict(delivery.headers)
    deaths = headers.get("x-death")
    queue = deaths[0].get("queue") if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else None
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
    )


def _header(value: object) -> str | None:
    return as_text(value) if isinstance(value, (bytes, str)) else None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def read_dead_letter(delivery: Delivery) -> DeadLetter:
    """Best effort: whatever the body is (garbage included), produce a typed error to answer."""
    headers = dict(delivery.headers)
    code = headers.get(H_CODE)
    code = code.decode() if isinstance(code, bytes) else code
    reason = headers.get(H_REASON)
    reason = reason.decode() if isinstance(reason, bytes) else reason
    job_id = tenant = lease = None
    # A job from a batch message has no properties of its own: its envelope knows the caller.
    reply_to, correlation_id = delivery.reply_to, delivery.correlation_id
    metadata: dict[str, Any] = {}
    budgets: tuple[BudgetHold, ...] = ()
    reserved = 0.0
    route = None
    try:
        env = Envelope.model_validate_json(delivery.body)
        job_id, tenant, lease, metadata = env.job_id, env.job.tenant, env.coalesce_key, env.job.metadata
        budgets, reserved = env.budgets, env.route.reserved_usd if env.route else 0.0
        if env.route is not None:
            route = RouteInfo(reason=env.route.reason, candidates=env.route.candidates, strategy=env.route.strategy)
        reply_to, correlation_id = env.reply_to or reply_to, env.correlation_id or correlation_id
    except (ValidationError, ValueError):
        try:
            data = json.loads(delivery.body)
            if isinstance(data, dict):
                job_id = _text(data.get("job_id"))
                job = data.get("job")
                tenant = _text(data.get("tenant")) or (_text(job.get("tenant")) if isinstance(job, dict) else None)
                if isinstance(job, dict) and "received_at" in data:
                    # An envelope that no longer validates (a job of a batch has no properties of
                    # its own); never a producer's body, whose reply_to is its message property.
                    reply_to = reply_to or _text(data.get("reply_to"))
                    correlation_id = correlation_id or _text(data.get("correlation_id"))
        except (ValueError, RecursionError):
            pass
    if not job_id:
        # Deterministic, so a redelivered dead letter is still recorded only once.
        job_id = delivery.message_id or "invalid-" + hashlib.sha256(delivery.body).hexdigest()[:24]
    return DeadLetter(
        job_id=job_id[:200],
        tenant=(tenant or "default")[:64],
        code=code if code in ERROR_CODES else "internal",
        reason=str(reason) if reason else _death_reason(headers),
        reply_to=reply_to or None,
        correlation_id=correlation_id,
        lease_key=lease,
        metadata=metadata,
        budgets=budgets,
        reserved_usd=reserved,
        route=route,
    )


class DeadLetterStage:
    name = "deadletter"

    def __init__(self, settings: Settings, redis: Redis, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.recorder = Recorder(settings, redis, self.name, clock)

    def input_queues(self) -> Sequence[str]:
        return (self.settings.topology.dead_notify,)

    def decode(self, delivery: Delivery) -> DeadLetter | DeadFeedback:
        return dead_feedback(delivery, self.settings.topology.feedback) or read_dead_letter(delivery)

    def fail(self, item: object, err: FareboxError) -> Handled:
        return Handled([])

    async def handle(self, item: DeadLetter | DeadFeedback, delivery: Delivery) -> Handled:
        if isinstance(item, DeadFeedback):
            error = ErrorInfo(code=item.code, message=item.reason)
            return Handled(receipt_publish(FeedbackReceipt(job_id=item.job_id, status="error", error=error), delivery))
        result = JobResult(
            job_id=item.job_id,
            tenant=item.tenant,
            status="error",
            metadata=item.metadata,
            error=ErrorInfo(code=item.code, message=item.reason),
            route=item.route,
        )
        return await self.recorder.record_and_reply(
            Recording(
                result=result,
                lease_key=item.lease_key,
                reply_to=item.reply_to,
                correlation_id=item.correlation_id,
                budgets=item.budgets,
                reserved_usd=item.reserved_usd,
            )
        )
