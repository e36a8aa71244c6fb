"""A job's ``metadata`` is capped at MAX_METADATA_BYTES as compact JSON: a bigger one is an invalid_request that
names the field and the limit, never the value; one at the limit goes through."""

from __future__ import annotations

import json
import uuid
from typing import Any

import aio_pika
import pytest
from pydantic import ValidationError

from farebox.errors import InvalidRequest, describe_validation_error
from farebox.schemas import Job, JobResult
from farebox.schemas.job import MAX_METADATA_BYTES
from farebox.settings import Settings
from farebox.stages.decode import parse_job
from tests.support.pipeline import InProcessPipeline, get_message

PLANTED = "PLANTED-METADATA-VALUE"


def metadata_of(size: int, char: str = "x") -> dict[str, Any]:
    """Metadata whose compact JSON is ``size`` bytes (``char`` of 1 to 3 UTF-8 bytes)."""
    frame = len(f'{{"note":"{PLANTED}"}}'.encode())
    width = len(char.encode())
    assert (size - frame) % width == 0
    meta = {"note": PLANTED + char * ((size - frame) // width)}
    assert len(json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode()) == size
    return meta


def test_the_limit_is_4_kib() -> None:
    assert MAX_METADATA_BYTES == 4096


@pytest.mark.parametrize(
    ("metadata", "ok"),
    [
        ({}, True),
        ({"batch": 7, "tags": ["a", "b"], "nested": {"deep": [1, 2, {"x": None}]}}, True),
        (metadata_of(MAX_METADATA_BYTES), True),
        (metadata_of(MAX_METADATA_BYTES + 1), False),
        (metadata_of(5 * 1024), False),
        # Bytes, not characters: 2-byte "é" fills the limit with half as many characters.
        (metadata_of(MAX_METADATA_BYTES - 1, "é"), True),
        (metadata_of(MAX_METADATA_BYTES + 1, "é"), False),
        ({f"k{i}": i for i in range(1000)}, False),  # many small keys add up
    ],
)
def test_metadata_size_table(metadata: dict[str, Any], ok: bool) -> None:
    body = json.dumps({"prompt": "hi", "metadata": metadata}).encode()
    if ok:
        assert parse_job(body, 10**6).metadata == metadata
        return
    with pytest.raises(InvalidRequest) as info:
        parse_job(body, 10**6)
    message = str(info.value)
    assert message.startswith("invalid job: metadata: ") and f"limit is {MAX_METADATA_BYTES} bytes" in message
    assert PLANTED not in message and "xxxx" not in message


def test_a_value_json_cannot_hold_is_a_typed_error_without_the_value() -> None:
    with pytest.raises(ValidationError) as info:
        Job.model_validate({"prompt": "hi", "metadata": {"when": object()}})
    assert describe_validation_error(info.value).startswith("metadata: metadata must serialize as JSON")


def test_the_client_refuses_it_before_publishing() -> None:
    from farebox.client import as_job

    with pytest.raises(InvalidRequest, match=f"metadata: .*limit is {MAX_METADATA_BYTES} bytes"):
        as_job({"prompt": "hi", "metadata": metadata_of(5 * 1024)})


async def test_through_the_pipeline_5_kib_is_invalid_request_and_4_kib_passes(
    pipeline: InProcessPipeline, settings: Settings
) -> None:
    """Raw bodies on the intake queue (a producer that does not use FareboxClient): each gets a typed reply."""
    await pipeline.start()
    bodies = {
        "big": {"prompt": "Summarize: metadata", "metadata": metadata_of(5 * 1024), "job_id": str(uuid.uuid4())},
        "fits": {"prompt": "Summarize: metadata", "metadata": metadata_of(4 * 1024), "job_id": str(uuid.uuid4())},
    }
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        replies = await channel.declare_queue(exclusive=True)
        for corr, body in bodies.items():
            await channel.default_exchange.publish(
                aio_pika.Message(json.dumps(body).encode(), reply_to=replies.name, correlation_id=corr),
                routing_key=settings.topology.intake,
            )
        answers = {}
        for _ in bodies:
            message = await get_message(replies, timeout=30)
            answers[message.correlation_id] = JobResult.model_validate_json(message.body)
    big, fits = answers["big"], answers["fits"]
    assert big.status == "error" and big.error is not None and big.error.code == "invalid_request"
    assert "metadata" in big.error.message and f"limit is {MAX_METADATA_BYTES} bytes" in big.error.message
    assert PLANTED not in big.error.message
    assert fits.status == "ok" and fits.metadata == bodies["fits"]["metadata"]
