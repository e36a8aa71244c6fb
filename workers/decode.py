"""Edge validation: raw intake bytes -> a validated Envelope, or a clear ``InvalidRequest``.

Error messages name fields and limits, never the submitted values (they may be prompt text or
personal data, and they end up in dead-letter reasons).
"""

from __future__ import annotations

import json
import uuid

from pydantic import ValidationError

from farebox.constants import job_record
from farebox.errors import ForeignMessage, InvalidRequest, describe_validation_error
from farebox.schemas import Envelope, Job
from farebox.settings import Settings
from farebox.stages.cache_keys import CacheRules, cache_key, is_cacheable
from farebox.stages.stage import Delivery


def parse_job(body: bytes, max_body_bytes: int) -> Job:
    if len(body) > max_body_bytes:
        raise InvalidRequest(
            f"message body is {len(body)} bytes; the limit is {max_body_bytes} (FAREBOX_MAX_BODY_BYTES)"
        )
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise InvalidRequest(f"body is not UTF-8 (bad byte at offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise InvalidRequest(f"body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:
        raise InvalidRequest("body JSON is nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"body must be a JSON object, got {type(data).__name__}")
    try:
        return Job.model_validate(data)
    except ValidationError as err:
        raise InvalidRequest("invalid job: " + describe_validation_error(err)) from None
    except RecursionError:
        raise InvalidRequest("body JSON is nested too deeply") from None


def envelope_from_intake(delivery: Delivery, settings: Settings, rules: CacheRules, now: float) -> Envelope:
    job = parse_job(delivery.body, settings.max_body_bytes)
    job_id = job.job_id or delivery.message_id or str(uuid.uuid4())
    # deadline_s counts from publish: the AMQP timestamp when the producer set one.
    published = delivery.timestamp if delivery.timestamp and delivery.timestamp <= now + 5 else now
    key = cache_key(job, rules) if is_cacheable(job, rules) else None
    coalesce = key if key is not None and job.cache.mode == "use" else f"job:{job_record(job.tenant, job_id)}"
    return Envelope(
        job_id=job_id,
        job=job,
        reply_to=delivery.reply_to or None,
        correlation_id=delivery.correlation_id,
        received_at=published,
        deadline_at=published + job.deadline_s if job.deadline_s else None,
        cache_key=key,
        coalesce_key=coalesce,
    )


def envelope_from_internal(delivery: Delivery, sender: str | None = None) -> Envelope:
    """The envelope a stage sent; with ``sender`` (auth mode user_id: the pipeline's own RabbitMQ user, which
    RabbitMQ vouches for) a message from anyone else is refused before it is read."""
    if sender is not None and delivery.user_id != sender:
        raise ForeignMessage(
            f"{delivery.queue} takes messages from the pipeline's own RabbitMQ user only (auth mode user_id); "
            "publish jobs to the intake"
        )
    try:
        return Envelope.model_validate_json(delivery.body)
    except ValidationError as err:
        raise InvalidRequest("invalid internal message: " + describe_validation_error(err)) from None
