"""The emulator's batch APIs over real HTTP on loopback, driven by the official SDKs where they exist.

OpenAI Files + Batches, Anthropic Message Batches and Gemini's inline batch mode: the lifecycle runs
on the clock (the delay knob), every answer equals the sync endpoint's, and the batch fault knobs
fail, expire or break lines deterministically under a seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import openai
import pydantic
import pytest
from openai.types import Batch

from farebox.emulator.knobs import EmulatorKnobs
from farebox.emulator.multipart import parse_form
from farebox.emulator.server import running
from farebox.emulator.wire import BadRequest

DELAY = 0.2
TERMINAL = {"completed", "failed", "expired", "cancelled"}
GPT = "gpt-4o-mini"
CLAUDE = "claude-3-5-haiku-latest"


@contextlib.asynccontextmanager
async def emulator(**knobs: Any) -> AsyncIterator[tuple[str, openai.AsyncOpenAI, anthropic.AsyncAnthropic]]:
    settings = {"batch_delay_s": DELAY, **knobs}
    async with running(EmulatorKnobs(port=0, **settings)) as url:
        oai = openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key="x", max_retries=0)
        ant = anthropic.AsyncAnthropic(base_url=f"{url}/anthropic", api_key="x", max_retries=0)
        async with oai, ant:
            yield url, oai, ant


def chat_body(i: int, **extra: Any) -> dict[str, Any]:
    return {"model": GPT, "max_tokens": 30, "messages": [{"role": "user", "content": f"question {i}"}], **extra}


def input_file(bodies: list[dict[str, Any]]) -> bytes:
    rows = [
        {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": b}
        for i, b in enumerate(bodies)
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


async def submit(client: openai.AsyncOpenAI, data: bytes, **extra: Any) -> Batch:
    uploaded = await client.files.create(file=("input.jsonl", data), purpose="batch")
    return await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", **extra
    )


async def until_ended(client: openai.AsyncOpenAI, batch_id: str) -> tuple[Batch, list[str]]:
    """Poll until the batch ends; also returns every status seen on the way."""
    seen: list[str] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        batch = await client.batches.retrieve(batch_id)
        if not seen or seen[-1] != batch.status:
            seen.append(batch.status)
        if batch.status in TERMINAL:
            return batch, seen
        await asyncio.sleep(0.02)
    raise AssertionError(f"batch {batch_id} did not end: {seen}")


async def read_jsonl(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await client.files.content(file_id)
    return [json.loads(line) for line in content.text.splitlines()]


# --- OpenAI ----------------------------------------------------------------------------------
async def test_openai_batch_round_trip_equals_the_sync_answers() -> None:
    bodies = [chat_body(i) for i in range(4)]
    async with emulator() as (_, client, _a):
        batch = await submit(client, input_file(bodies), metadata={"job": "nightly"})
        assert batch.status == "validating" and batch.request_counts is not None
        assert batch.request_counts.total == 0 and batch.output_file_id is None
        ended, seen = await until_ended(client, batch.id)
        output = await read_jsonl(client, ended.output_file_id)
        sync = [await client.chat.completions.create(**body) for body in bodies]
        out_file = await client.files.retrieve(ended.output_file_id or "")
    assert seen[0] == "validating" and seen[-1] == "completed" and "in_progress" in seen
    assert ended.error_file_id is None and ended.errors is None and ended.model == GPT
    assert ended.metadata == {"job": "nightly"}
    assert ended.request_counts is not None
    assert (ended.request_counts.total, ended.request_counts.completed, ended.request_counts.failed) == (4, 4, 0)
    assert None not in (ended.in_progress_at, ended.finalizing_at, ended.completed_at, ended.expires_at)
    assert out_file.purpose == "batch_output" and out_file.filename == f"{batch.id}_output.jsonl"
    assert [row["custom_id"] for row in output] == [f"req-{i}" for i in range(4)]
    for row, answer in zip(output, sync, strict=True):
        assert row["error"] is None and row["id"].startswith("batch_req_")
        response = row["response"]
        assert response["status_code"] == 200 and response["request_id"]
        body = response["body"]
        assert body["choices"][0]["message"]["content"] == answer.choices[0].message.content
        assert answer.usage is not None and body["usage"] == answer.usage.model_dump(exclude_unset=True)
    assert ended.usage is not None
    assert ended.usage.input_tokens == sum(a.usage.prompt_tokens for a in sync if a.usage)
    assert ended.usage.output_tokens == sum(a.usage.completion_tokens for a in sync if a.usage)


async def test_openai_batch_ends_by_the_clock_not_by_polls() -> None:
    async with emulator() as (_, client, _a):
        batch = await submit(client, input_file([chat_body(0), chat_body(1)]))
        await asyncio.sleep(DELAY * 1.2)
        once = await client.batches.retrieve(batch.id)  # the first poll since creation
        listed = await client.batches.list()
    assert once.status == "completed" and once.output_file_id is not None
    assert [b.id for b in listed.data] == [batch.id]


async def test_openai_request_the_sync_endpoint_refuses_goes_to_the_error_file() -> None:
    bad = {"model": GPT, "max_tokens": 5, "messages": []}
    async with emulator() as (url, client, _a):
        batch = await submit(client, input_file([chat_body(0), bad]))
        ended, _ = await until_ended(client, batch.id)
        errors = await read_jsonl(client, ended.error_file_id)
        async with httpx.AsyncClient() as http:
            sync = await http.post(f"{url}/openai/v1/chat/completions", json=bad)
    assert ended.status == "completed" and ended.request_counts is not None
    assert (ended.request_counts.completed, ended.request_counts.failed) == (1, 1)
    assert len(errors) == 1 and errors[0]["custom_id"] == "req-1" and errors[0]["error"] is None
    assert errors[0]["response"]["status_code"] == sync.status_code == 400
    assert errors[0]["response"]["body"] == sync.json()


def _row(custom_id: str, url: str = "/v1/chat/completions", **body: Any) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": {**chat_body(0), **body}})


@pytest.mark.parametrize(
    ("data", "code", "line"),
    [
        (f"{_row('a')}\nnot json\n".encode(), "invalid_json_line", 2),
        (f"{_row('a')}\n{_row('a')}\n".encode(), "duplicate_custom_id", 2),
        (f"{_row('a', url='/v1/embeddings')}\n".encode(), "invalid_url", 1),
        (f"{_row('a')}\n{_row('b', model='gpt-4o')}\n".encode(), "mismatched_model", 2),
        (b'{"method": "POST", "url": "/v1/chat/completions", "body": {}}\n', "missing_required_parameter", 1),
        (b"\n", "empty_file", None),
    ],
)
async def test_openai_malformed_input_fails_validation(data: bytes, code: str, line: int | None) -> None:
    async with emulator() as (_, client, _a):
        batch = await submit(client, data)
        ended, seen = await until_ended(client, batch.id)
    # Validating when made; the first poll may come after it (a loaded machine), so it need not see that state.
    assert batch.status == "validating" and seen[-1] == "failed" and set(seen) <= {"validating", "failed"}
    assert ended.errors is not None and ended.errors.object == "list" and ended.errors.data
    assert (ended.errors.data[0].code, ended.errors.data[0].line) == (code, line)
    assert ended.failed_at is not None and ended.in_progress_at is None
    assert ended.output_file_id is None and ended.error_file_id is None
    assert ended.request_counts is not None and ended.request_counts.total == 0


async def test_openai_refusals_at_upload_and_creation() -> None:
    async with emulator() as (_, client, _a):
        with pytest.raises(openai.BadRequestError, match=r"\.jsonl"):
            await client.files.create(file=("input.txt", b"{}"), purpose="batch")
        uploaded = await client.files.create(file=("input.jsonl", input_file([chat_body(0)])), purpose="batch")
        with pytest.raises(openai.BadRequestError) as refused:
            await client.batches.create(
                input_file_id=uploaded.id,
                endpoint="/v1/embeddings",
                completion_window="24h",
            )
        with pytest.raises(openai.NotFoundError):
            await client.batches.create(
                input_file_id="file-missing", endpoint="/v1/chat/completions", completion_window="24h"
            )
        with pytest.raises(openai.NotFoundError):
            await client.batches.retrieve("batch_missing")
        gone = await client.files.delete(uploaded.id)
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(uploaded.id)
    assert refused.value.param == "endpoint" and gone.deleted


async def test_openai_cancel_keeps_what_ran_and_lists_the_rest() -> None:
    async with emulator(batch_delay_s=1.0) as (_, client, _a):
        batch = await submit(client, input_file([chat_body(i) for i in range(4)]))
        await asyncio.sleep(0.4)  # requests finish at 0.3, 0.5, 0.7 and 0.9 s
        cancelling = await client.batches.cancel(batch.id)
        ended, _ = await until_ended(client, batch.id)
        output = await read_jsonl(client, ended.output_file_id)
        errors = await read_jsonl(client, ended.error_file_id)
        again = await client.batches.cancel(batch.id)  # cancelling a cancelled batch changes nothing
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    assert ended.status == "cancelled" and ended.cancelled_at is not None and again.status == "cancelled"
    assert 1 <= len(output) < 4 and len(output) + len(errors) == 4
    assert all(row["error"]["code"] == "batch_cancelled" and row["response"] is None for row in errors)


async def test_openai_cancel_of_an_ended_batch_is_a_conflict() -> None:
    async with emulator() as (_, client, _a):
        batch = await submit(client, input_file([chat_body(0)]))
        await until_ended(client, batch.id)
        with pytest.raises(openai.ConflictError):
            await client.batches.cancel(batch.id)


async def test_openai_fail_fault_fails_the_batch_at_validation() -> None:
    async with emulator(batch_fail_rate=1.0) as (url, client, _a):
        batch = await submit(client, input_file([chat_body(0)]))
        ended, seen = await until_ended(client, batch.id)
        async with httpx.AsyncClient() as http:
            stats = (await http.get(f"{url}/_emulator/stats")).json()
    assert batch.status == "validating" and seen[-1] == "failed" and set(seen) <= {"validating", "failed"}
    assert ended.errors is not None and ended.errors.data and ended.errors.data[0].code == "token_limit_exceeded"
    assert stats["batches"]["faults"] == {"fail": 1}


async def test_openai_expire_fault_runs_half_and_expires_the_rest() -> None:
    async with emulator(batch_expire_rate=1.0) as (_, client, _a):
        batch = await submit(client, input_file([chat_body(i) for i in range(4)]))
        ended, _ = await until_ended(client, batch.id)
        output = await read_jsonl(client, ended.output_file_id)
        errors = await read_jsonl(client, ended.error_file_id)
    assert ended.status == "expired" and ended.expired_at is not None
    assert [row["custom_id"] for row in output] == ["req-0", "req-1"]
    assert [row["custom_id"] for row in errors] == ["req-2", "req-3"]
    assert all(row["error"]["code"] == "batch_expired" for row in errors)


async def failing_lines(seed: int) -> list[str]:
    async with emulator(batch_error_line_rate=0.5, seed=seed) as (_, client, _a):
        batch = await submit(client, input_file([chat_body(i) for i in range(12)]))
        ended, _ = await until_ended(client, batch.id)
        errors = await read_jsonl(client, ended.error_file_id)
    assert all(row["response"]["status_code"] == 500 for row in errors)
    assert all(row["response"]["body"]["error"]["type"] == "server_error" for row in errors)
    return [row["custom_id"] for row in errors]


async def test_line_error_fault_is_deterministic_under_a_seed() -> None:
    first, again, other = await failing_lines(7), await failing_lines(7), await failing_lines(8)
    assert first == again and 0 < len(first) < 12
    assert other != first


# --- Anthropic -------------------------------------------------------------------------------
def message_params(i: int, **extra: Any) -> dict[str, Any]:
    return {"model": CLAUDE, "max_tokens": 30, "messages": [{"role": "user", "content": f"question {i}"}], **extra}


async def anthropic_results(client: anthropic.AsyncAnthropic, batch_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while (batch := await client.messages.batches.retrieve(batch_id)).processing_status != "ended":
        assert time.monotonic() < deadline, "the batch did not end"
        await asyncio.sleep(0.02)
    return {r.custom_id: r.result async for r in await client.messages.batches.results(batch_id)} | {"": batch}


async def test_anthropic_batch_round_trip_equals_the_sync_answers() -> None:
    requests = [{"custom_id": f"m{i}", "params": message_params(i)} for i in range(3)]
    requests.append({"custom_id": "bad", "params": {"model": CLAUDE, "messages": [{"role": "user", "content": "x"}]}})
    async with emulator() as (url, _o, client):
        created = await client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        results = await anthropic_results(client, created.id)
        sync = [await client.messages.create(**message_params(i)) for i in range(3)]
        async with httpx.AsyncClient() as http:
            refused = await http.post(f"{url}/anthropic/v1/messages", json=requests[-1]["params"])
    assert created.processing_status == "in_progress" and created.request_counts.processing == 4
    assert created.results_url is None and created.id.startswith("msgbatch_")
    batch = results.pop("")
    assert batch.request_counts.succeeded == 3 and batch.request_counts.errored == 1
    assert batch.ended_at is not None and batch.results_url.startswith(f"{url}/anthropic/v1/messages/batches/")
    for i, answer in enumerate(sync):
        result = results[f"m{i}"]
        assert result.type == "succeeded"
        assert result.message.content == answer.content and result.message.usage == answer.usage
    errored = results["bad"]
    assert errored.type == "errored" and errored.error.error.type == "invalid_request_error"
    assert errored.error.error.message == refused.json()["error"]["message"]


async def test_anthropic_cancel_ends_with_canceled_results() -> None:
    async with emulator(batch_delay_s=1.0) as (_, _o, client):
        created = await client.messages.batches.create(
            requests=[{"custom_id": f"m{i}", "params": message_params(i)} for i in range(4)]  # type: ignore[typeddict-item]
        )
        canceling = await client.messages.batches.cancel(created.id)
        results = await anthropic_results(client, created.id)
        batch = results.pop("")
    assert canceling.processing_status == "canceling" and canceling.cancel_initiated_at is not None
    assert batch.request_counts.canceled == 4 and {r.type for r in results.values()} == {"canceled"}


async def test_anthropic_expire_and_line_error_faults() -> None:
    requests = [{"custom_id": f"m{i}", "params": message_params(i)} for i in range(4)]
    async with emulator(batch_expire_rate=1.0) as (_, _o, client):
        expired = await anthropic_results(client, (await client.messages.batches.create(requests=requests)).id)  # type: ignore[arg-type]
    async with emulator(batch_error_line_rate=1.0) as (_, _o, client):
        broken = await anthropic_results(client, (await client.messages.batches.create(requests=requests)).id)  # type: ignore[arg-type]
    assert expired.pop("").request_counts.expired == 2
    assert [r.type for r in expired.values()] == ["succeeded", "succeeded", "expired", "expired"]
    assert broken.pop("").request_counts.errored == 4
    assert {r.error.error.type for r in broken.values()} == {"api_error"}


async def test_anthropic_fail_fault_and_bad_batches_are_refused_at_creation() -> None:
    params = message_params(0)
    async with emulator(batch_fail_rate=1.0) as (_, _o, client):
        with pytest.raises(anthropic.RateLimitError):
            await client.messages.batches.create(requests=[{"custom_id": "a", "params": params}])  # type: ignore[typeddict-item]
        listed = await client.messages.batches.list()
    async with emulator() as (_, _o, client):
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.batches.create(
                requests=[{"custom_id": "a", "params": params}, {"custom_id": "a", "params": params}]  # type: ignore[typeddict-item]
            )
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.batches.retrieve("msgbatch_missing")
    assert listed.data == []


# --- Gemini ----------------------------------------------------------------------------------
def generate(i: int) -> dict[str, Any]:
    return {"contents": [{"parts": [{"text": f"question {i}"}]}], "generationConfig": {"maxOutputTokens": 30}}


async def gemini_batch(http: httpx.AsyncClient, requests: list[dict[str, Any]]) -> dict[str, Any]:
    body = {"batch": {"displayName": "t", "inputConfig": {"requests": {"requests": requests}}}}
    r = await http.post("/v1beta/models/gemini-2.0-flash:batchGenerateContent", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def gemini_done(http: httpx.AsyncClient, name: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while not (op := (await http.get(f"/v1beta/{name}")).json()).get("done"):
        assert time.monotonic() < deadline, "the batch did not end"
        await asyncio.sleep(0.02)
    return dict(op)


async def test_gemini_inline_batch_equals_the_sync_answers() -> None:
    requests = [{"request": generate(i), "metadata": {"key": f"k{i}"}} for i in range(2)]
    async with emulator() as (url, _o, _a), httpx.AsyncClient(base_url=url) as http:
        created = await gemini_batch(http, requests)
        op = await gemini_done(http, created["name"])
        sync = [
            (await http.post("/v1beta/models/gemini-2.0-flash:generateContent", json=generate(i))).json()
            for i in range(2)
        ]
        listed = (await http.get("/v1beta/batches")).json()
    assert created["metadata"]["state"] == "BATCH_STATE_PENDING" and "done" not in created
    assert op["metadata"]["state"] == "BATCH_STATE_SUCCEEDED"
    assert op["metadata"]["batchStats"]["successfulRequestCount"] == "2"
    responses = op["response"]["inlinedResponses"]["inlinedResponses"]
    assert [item["metadata"] for item in responses] == [{"key": "k0"}, {"key": "k1"}]
    for item, answer in zip(responses, sync, strict=True):
        assert item["response"]["candidates"][0]["content"] == answer["candidates"][0]["content"]
        assert item["response"]["usageMetadata"] == answer["usageMetadata"]
    assert [o["name"] for o in listed["operations"]] == [created["name"]]


async def test_gemini_cancel_and_file_input() -> None:
    async with emulator(batch_delay_s=1.0) as (url, _o, _a), httpx.AsyncClient(base_url=url) as http:
        created = await gemini_batch(http, [{"request": generate(0)}])
        cancel = await http.post(f"/v1beta/{created['name']}:cancel")
        op = await gemini_done(http, created["name"])
        from_file = await http.post(
            "/v1beta/models/m:batchGenerateContent", json={"batch": {"inputConfig": {"fileName": "files/x"}}}
        )
    assert cancel.status_code == 200 and cancel.json() == {}
    assert op["metadata"]["state"] == "BATCH_STATE_CANCELLED" and op["error"]["code"] == 1
    assert from_file.status_code == 400 and from_file.json()["error"]["status"] == "INVALID_ARGUMENT"


# --- stats, routes, knobs --------------------------------------------------------------------
async def test_stats_count_batches_until_reset() -> None:
    async with emulator() as (url, client, _a), httpx.AsyncClient(base_url=url) as http:
        before = (await http.get("/_emulator/stats")).json()
        batch = await submit(client, input_file([chat_body(0), chat_body(1)]))
        await until_ended(client, batch.id)
        seen = (await http.get("/_emulator/stats")).json()
        await http.post("/_emulator/reset")
        after = (await http.get("/_emulator/stats")).json()
    assert "batches" not in before and "batches" not in after
    assert seen["requests"] == {}, "batch requests are counted apart from sync ones"
    assert seen["batches"] == {
        "created": {"openai": 1},
        "status": {"openai/completed": 1},
        "requests": {f"openai/{GPT}": 2},
        "results": {"succeeded": 2},
        "faults": {},
    }


@pytest.mark.parametrize(
    ("method", "path", "code", "allow"),
    [
        ("PUT", "/openai/v1/batches", 405, "GET, HEAD, POST"),
        ("DELETE", "/openai/v1/files", 405, "GET, HEAD, POST"),
        ("GET", "/openai/v1/batches/missing/cancel", 404, None),  # the batch is looked up before the method
        ("GET", "/v1/batches/missing", 404, None),
        ("GET", "/openai/v1/files/missing/content", 404, None),
        ("GET", "/openai/v1/files/x/y/z", 404, None),
        ("POST", "/anthropic/v1/messages/batches/x/results", 404, None),  # no such batch: looked up first
        ("GET", "/v1beta/batches/missing", 404, None),
        ("POST", "/v1beta/batches/x:pause", 404, None),
    ],
)
async def test_batch_routes_refuse_wrong_methods_and_unknown_paths(
    method: str, path: str, code: int, allow: str | None
) -> None:
    async with emulator() as (url, _o, _a), httpx.AsyncClient(base_url=url) as http:
        r = await http.request(method, path)
    assert r.status_code == code and r.headers.get("allow") == allow


async def test_a_batch_belongs_to_the_provider_it_was_made_under() -> None:
    async with emulator() as (url, client, _a):
        batch = await submit(client, input_file([chat_body(0)]))
        other = openai.AsyncOpenAI(base_url=f"{url}/vllm/v1", api_key="x", max_retries=0)
        async with other:
            with pytest.raises(openai.NotFoundError):
                await other.batches.retrieve(batch.id)


async def test_batch_faults_follow_the_faulty_knob() -> None:
    async with emulator(batch_fail_rate=1.0, faulty="anthropic") as (_, client, _a):
        batch = await submit(client, input_file([chat_body(0)]))
        ended, _ = await until_ended(client, batch.id)
    assert ended.status == "completed"


def test_batch_knobs_validate() -> None:
    with pytest.raises(pydantic.ValidationError):
        EmulatorKnobs(batch_fail_rate=0.6, batch_expire_rate=0.5)
    with pytest.raises(pydantic.ValidationError):
        EmulatorKnobs(batch_delay_s=-1)
    assert EmulatorKnobs().batch_delay_s == 3.0


def test_multipart_parsing() -> None:
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="caf\xc3\xa9.jsonl"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\nline\r\n--not the boundary\r\n"
        b"--XyZ--\r\n"
    )
    form = parse_form('multipart/form-data; boundary="XyZ"', body)
    assert form["purpose"].data == b"batch" and form["purpose"].filename is None
    assert form["file"].data == b"line\r\n--not the boundary" and form["file"].filename == "café.jsonl"
    with pytest.raises(BadRequest):
        parse_form("application/json", body)
    with pytest.raises(BadRequest):
        parse_form("multipart/form-data; boundary=XyZ", body.removesuffix(b"--XyZ--\r\n"))
