"""The batch adapters (farebox/providers/batch_*.py): against the emulator's batch APIs over real HTTP
on loopback (the provider client's transport), and against httpx.MockTransport for the exact
requests they send and how every HTTP and per-line outcome maps onto farebox's error tree."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pydantic
import pytest

from farebox.emulator.knobs import EmulatorKnobs
from farebox.emulator.multipart import parse_form
from farebox.emulator.server import running
from farebox.errors import InvalidRequest, ProviderRejected, ProviderUnavailable, RateLimited
from farebox.providers.anthropic import AnthropicAdapter
from farebox.providers.base import JsonAdapter
from farebox.providers.batch_anthropic import AnthropicBatchAdapter
from farebox.providers.batch_gemini import GeminiBatchAdapter
from farebox.providers.batch_openai import OpenAIBatchAdapter
from farebox.providers.batch_registry import build_batch_adapter
from farebox.providers.batch_types import BatchAdapter, BatchHandle, BatchLine, BatchRequest, BatchStatus
from farebox.providers.calls import provider_client
from farebox.providers.gemini import GeminiAdapter
from farebox.providers.openai import OpenAIAdapter
from farebox.providers.registry import provider_configs
from farebox.schemas import ChatMessage

DELAY = 0.2
KEY = "sk-test-SECRET-0123456789abcdef"
PROVIDERS = ("openai", "anthropic", "google")


@dataclass(frozen=True)
class Kind:
    path: str  # under the emulator's URL
    model: str
    batch: Callable[..., BatchAdapter]
    sync: Callable[..., JsonAdapter]


KINDS = {
    "openai": Kind("/openai/v1", "gpt-4o-mini", OpenAIBatchAdapter, OpenAIAdapter),
    "anthropic": Kind("/anthropic/v1", "claude-3-5-haiku-latest", AnthropicBatchAdapter, AnthropicAdapter),
    "google": Kind("/google/v1beta", "gemini-2.0-flash", GeminiBatchAdapter, GeminiAdapter),
}


def batch_requests(n: int = 4) -> list[BatchRequest]:
    def messages(i: int) -> tuple[ChatMessage, ...]:
        question = ChatMessage(role="user", content=f"question {i}")
        return (ChatMessage(role="system", content="be brief"), question) if i % 2 else (question,)

    return [BatchRequest(custom_id=f"r{i}", messages=messages(i), max_tokens=30, temperature=0.2) for i in range(n)]


@contextlib.asynccontextmanager
async def emulated(provider: str, **knobs: Any) -> AsyncIterator[tuple[BatchAdapter, JsonAdapter, str]]:
    """The provider's batch and sync adapters over the process's real provider client."""
    kind = KINDS[provider]
    async with running(EmulatorKnobs(port=0, **{"batch_delay_s": DELAY, **knobs})) as url:
        client = provider_client(max_connections=4, timeout_s=5.0)
        try:
            yield kind.batch(client, url + kind.path, None), kind.sync(client, url + kind.path, None), kind.model
        finally:
            await client.aclose()


async def until_ended(adapter: BatchAdapter, handle: BatchHandle) -> BatchStatus:
    deadline = time.monotonic() + 5
    while not (status := await adapter.poll(handle)).ended:
        assert time.monotonic() < deadline, f"the batch did not end: {status}"
        await asyncio.sleep(0.03)
    return status


# --- against the emulator ------------------------------------------------------------------
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_round_trip_equals_the_sync_answers(provider: str) -> None:
    requests = batch_requests()
    async with emulated(provider) as (adapter, sync, model):
        handle = await adapter.submit(model, requests, "nightly-1")
        first = await adapter.poll(handle)
        with pytest.raises(ProviderUnavailable, match="has not ended"):
            await adapter.results(handle)
        status = await until_ended(adapter, handle)
        lines = await adapter.results(handle)
        answers = [await sync.complete(r.provider_request(model, 5.0)) for r in requests]
    assert handle.provider == provider and handle.model == model and handle.custom_ids == ("r0", "r1", "r2", "r3")
    assert first.state == "in_progress" and status.state == "ended" and status.error is None
    assert (status.counts.total, status.counts.succeeded, status.counts.failed, status.counts.pending) == (4, 4, 0, 0)
    assert [line.custom_id for line in lines] == list(handle.custom_ids)
    assert all(line.state == "succeeded" and line.ran and line.error is None for line in lines)
    assert [line.reply for line in lines] == answers
    assert all(a.usage_reported and a.usage.input_tokens > 0 for a in answers)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_expire_fault_marks_the_unfinished_lines_expired(provider: str) -> None:
    async with emulated(provider, batch_expire_rate=1.0) as (adapter, _, model):
        handle = await adapter.submit(model, batch_requests(), "nightly-2")
        status = await until_ended(adapter, handle)
        lines = {line.custom_id: line for line in await adapter.results(handle)}
    assert status.state == "expired" and set(lines) == set(handle.custom_ids)
    assert lines["r2"].state == lines["r3"].state == "expired"  # the emulator runs the first half only
    for line in lines.values():
        if line.state != "succeeded":  # Gemini returns no responses for an expired batch: every line
            assert line.state == "expired" and not line.ran
            assert line.error is not None and line.error.retryable and line.error.code == "provider_error"
    if provider != "google":
        assert lines["r0"].state == lines["r1"].state == "succeeded"


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_error_line_fault_gives_typed_error_lines(provider: str) -> None:
    async with emulated(provider, batch_error_line_rate=1.0) as (adapter, _, model):
        handle = await adapter.submit(model, batch_requests(2), "nightly-3")
        status = await until_ended(adapter, handle)
        lines = await adapter.results(handle)
    assert status.state == "ended" and status.counts.failed == 2
    assert [line.state for line in lines] == ["errored", "errored"] and all(line.ran for line in lines)
    for line in lines:
        assert line.reply is None and line.error is not None
        assert (line.error.code, line.error.retryable) == ("provider_error", True)  # the sync 500's family
        assert "500" in line.error.message


@pytest.mark.parametrize("provider", ["openai", "google"])
async def test_fail_fault_fails_the_batch_with_a_retryable_reason(provider: str) -> None:
    async with emulated(provider, batch_fail_rate=1.0) as (adapter, _, model):
        handle = await adapter.submit(model, batch_requests(2), "nightly-4")
        status = await until_ended(adapter, handle)
        lines = await adapter.results(handle)
    assert status.state == "failed" and status.error is not None
    assert status.error.retryable and status.error.code == "provider_error"  # a full queue, not a bad input
    assert [(line.custom_id, line.state, line.ran) for line in lines] == [
        ("r0", "failed", False),
        ("r1", "failed", False),
    ]


async def test_fail_fault_refuses_the_anthropic_submit_as_rate_limited() -> None:
    async with emulated("anthropic", batch_fail_rate=1.0, retry_after_s=2.0) as (adapter, _, model):
        with pytest.raises(RateLimited) as refused:
            await adapter.submit(model, batch_requests(1), "nightly-5")
    assert refused.value.retry_after_s == 2.0 and "429" in str(refused.value)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_cancel_marks_the_lines_not_run_cancelled(provider: str) -> None:
    async with emulated(provider, batch_delay_s=1.0) as (adapter, _, model):
        handle = await adapter.submit(model, batch_requests(), "nightly-6")
        await adapter.cancel(handle)
        status = await until_ended(adapter, handle)
        lines = await adapter.results(handle)
        await adapter.cancel(handle)  # cancelling an ended batch changes nothing and raises nothing
    assert status.state == "cancelled"
    assert [(line.state, line.ran) for line in lines] == [("cancelled", False)] * 4


async def test_openai_find_returns_the_handle_submit_returned() -> None:
    async with emulated("openai") as (adapter, _, model):
        handle = await adapter.submit(model, batch_requests(3), "resume-me")
        other = await adapter.submit(model, batch_requests(1), "someone-else")
        found = await adapter.find("resume-me")
        missing = await adapter.find("never-submitted")
        await until_ended(adapter, handle)
        await adapter.cancel(handle)  # a 409: it has ended
    assert found == handle and found != other and missing is None


async def test_gemini_find_matches_the_display_name_and_anthropic_finds_nothing() -> None:
    async with emulated("google") as (adapter, _, model):
        handle = await adapter.submit(model, batch_requests(2), "resume-me")
        found = await adapter.find("resume-me")
        await until_ended(adapter, handle)
        assert found is not None
        lines = await adapter.results(found)  # no custom_ids on a found handle: named by the echoed metadata
    assert found == handle.model_copy(update={"custom_ids": ()})
    assert [line.custom_id for line in lines] == ["r0", "r1"]
    async with emulated("anthropic") as (adapter, _, model):
        await adapter.submit(model, batch_requests(1), "resume-me")
        assert await adapter.find("resume-me") is None


# --- the requests sent (MockTransport) -------------------------------------------------------
Handler = Callable[[httpx.Request], httpx.Response]


class Mock:
    """A MockTransport client that records requests and answers from a route table."""

    def __init__(self, routes: dict[tuple[str, str], Handler | httpx.Response]) -> None:
        self.routes = routes
        self.requests: list[httpx.Request] = []
        self.client = httpx.AsyncClient(transport=httpx.MockTransport(self.handle))

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        for (method, suffix), answer in self.routes.items():
            if request.method == method and request.url.path.endswith(suffix):
                return answer(request) if callable(answer) else answer
        return httpx.Response(404, json={"error": {"message": "no route"}})

    def sent(self, method: str, suffix: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path.endswith(suffix)]


def adapter(provider: str, mock: Mock) -> BatchAdapter:
    return KINDS[provider].batch(mock.client, f"https://api.test{KINDS[provider].path}", KEY)


def handle_for(provider: str, *ids: str) -> BatchHandle:
    return BatchHandle(
        provider=provider, batch_id="b1", model=KINDS[provider].model, idempotency_key="k", custom_ids=ids
    )


async def test_openai_uploads_jsonl_of_chat_requests_and_creates_the_batch() -> None:
    mock = Mock(
        {
            ("POST", "/files"): httpx.Response(200, json={"id": "file-1"}),
            ("POST", "/batches"): httpx.Response(200, json={"id": "batch_1"}),
        }
    )
    requests = batch_requests(2)
    handle = await adapter("openai", mock).submit("gpt-4o-mini", requests, "job-7")
    (upload,), (create,) = mock.sent("POST", "/files"), mock.sent("POST", "/batches")
    form = parse_form(upload.headers["content-type"], upload.content)
    rows = [json.loads(line) for line in form["file"].data.decode().splitlines()]
    sync = OpenAIAdapter(mock.client, "https://api.test/openai/v1", KEY)
    assert form["purpose"].data == b"batch" and form["file"].filename == "farebox-job-7.jsonl"
    assert rows == [
        {
            "custom_id": r.custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": sync.body(r.provider_request("gpt-4o-mini", 1)),
        }
        for r in requests
    ]
    assert json.loads(create.content) == {
        "input_file_id": "file-1",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"farebox_idempotency_key": "job-7"},
    }
    assert upload.headers["authorization"] == create.headers["authorization"] == f"Bearer {KEY}"
    assert handle == BatchHandle(
        provider="openai", batch_id="batch_1", model="gpt-4o-mini", idempotency_key="job-7", custom_ids=("r0", "r1")
    )


async def test_anthropic_sends_custom_ids_and_the_sync_params() -> None:
    mock = Mock({("POST", "/messages/batches"): httpx.Response(200, json={"id": "msgbatch_1"})})
    requests = batch_requests(2)
    await adapter("anthropic", mock).submit("claude-x", requests, "job-7")
    (create,) = mock.requests
    sync = AnthropicAdapter(mock.client, "https://api.test/anthropic/v1", KEY)
    assert create.url.path == "/anthropic/v1/messages/batches"
    assert json.loads(create.content) == {
        "requests": [
            {"custom_id": r.custom_id, "params": sync.body(r.provider_request("claude-x", 1))} for r in requests
        ]
    }
    assert create.headers["x-api-key"] == KEY and create.headers["anthropic-version"] == "2023-06-01"


async def test_gemini_sends_inline_requests_named_by_the_key() -> None:
    mock = Mock({("POST", ":batchGenerateContent"): httpx.Response(200, json={"name": "batches/abc"})})
    requests = batch_requests(2)
    handle = await adapter("google", mock).submit("models/gemini-x", requests, "job-7")
    (create,) = mock.requests
    sync = GeminiAdapter(mock.client, "https://api.test/google/v1beta", KEY)
    inlined = [
        {"request": sync.body(r.provider_request("m", 1)), "metadata": {"custom_id": r.custom_id}} for r in requests
    ]
    assert create.url.path == "/google/v1beta/models/gemini-x:batchGenerateContent"
    assert json.loads(create.content) == {
        "batch": {"displayName": "job-7", "inputConfig": {"requests": {"requests": inlined}}}
    }
    assert create.headers["x-goog-api-key"] == KEY and "key" not in create.url.params
    assert handle.batch_id == "abc"


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_bad_batches_are_refused_before_any_call(provider: str) -> None:
    mock = Mock({})
    one = batch_requests(1)
    for requests, key in ((one + one, "k"), (one, "not a key"), (one, "k" * 65), ([], "k")):
        with pytest.raises(InvalidRequest):
            await adapter(provider, mock).submit("m", requests, key)
    with pytest.raises(pydantic.ValidationError):
        BatchRequest(custom_id="job/1", messages=one[0].messages, max_tokens=5)
    assert mock.requests == []


# --- error mapping -------------------------------------------------------------------------
def raising(exc: Exception) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


SUBMIT_FAILURES: list[tuple[str, Handler | httpx.Response, type[Exception]]] = [
    ("429", httpx.Response(429, headers={"retry-after": "7"}, json={"error": {"message": "slow down"}}), RateLimited),
    ("500", httpx.Response(500, json={"error": {"message": "boom"}}), ProviderUnavailable),
    ("503", httpx.Response(503, text="upstream down"), ProviderUnavailable),
    (
        "529",
        httpx.Response(529, json={"type": "error", "error": {"type": "overloaded_error", "message": "x"}}),
        ProviderUnavailable,
    ),
    ("408", httpx.Response(408, text=""), ProviderUnavailable),
    (
        "400",
        httpx.Response(400, json={"error": {"type": "invalid_request_error", "message": f"bad {KEY}"}}),
        ProviderRejected,
    ),
    (
        "401",
        httpx.Response(401, json={"error": {"message": "Incorrect API key sk-test-SECR****cdef"}}),
        ProviderRejected,
    ),
    ("404", httpx.Response(404, json={"error": {"message": "no such model"}}), ProviderRejected),
    ("not-json", httpx.Response(200, text="<html>proxy</html>"), ProviderUnavailable),
    ("no-id", httpx.Response(200, json={"object": "batch"}), ProviderUnavailable),
    ("timeout", raising(httpx.ReadTimeout("slow")), ProviderUnavailable),
    ("refused", raising(httpx.ConnectError("connection refused")), ProviderUnavailable),
]
CREATE_ROUTE = {
    "openai": ("POST", "/batches"),
    "anthropic": ("POST", "/messages/batches"),
    "google": ("POST", ":batchGenerateContent"),
}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(("case", "answer", "expected"), SUBMIT_FAILURES, ids=[c[0] for c in SUBMIT_FAILURES])
async def test_submit_failures_map_to_the_error_tree(
    provider: str, case: str, answer: Handler | httpx.Response, expected: type[Exception]
) -> None:
    mock = Mock({("POST", "/files"): httpx.Response(200, json={"id": "file-1"}), CREATE_ROUTE[provider]: answer})
    with pytest.raises(expected) as caught:
        await adapter(provider, mock).submit("m", batch_requests(1), "k")
    assert type(caught.value) is expected and KEY not in str(caught.value) and "question" not in str(caught.value)
    if case == "429":
        assert isinstance(caught.value, RateLimited) and caught.value.retry_after_s == 7.0
    if provider == "openai":  # a refusal with an answer drops the uploaded file; after a timeout the batch may exist
        answered = case not in ("timeout", "refused") and not case.startswith(("not-json", "no-id"))
        assert len(mock.sent("DELETE", "/files/file-1")) == (1 if answered else 0)


def openai_results(rows: list[dict[str, Any]], status: str = "completed") -> Mock:
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    batch = {"id": "b1", "status": status, "output_file_id": "file-out", "request_counts": {"total": len(rows)}}
    return Mock(
        {
            ("GET", "/batches/b1"): httpx.Response(200, json=batch),
            ("GET", "/files/file-out/content"): httpx.Response(200, content=data),
        }
    )


def anthropic_results(rows: list[dict[str, Any]]) -> Mock:
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    batch = {"id": "b1", "processing_status": "ended", "request_counts": {"succeeded": 1}}
    return Mock(
        {
            ("GET", "/batches/b1"): httpx.Response(200, json=batch),
            ("GET", "/b1/results"): httpx.Response(200, content=data),
        }
    )


def gemini_results(items: list[dict[str, Any]]) -> Mock:
    operation = {
        "name": "batches/b1",
        "done": True,
        "metadata": {"state": "BATCH_STATE_SUCCEEDED", "batchStats": {"requestCount": str(len(items))}},
        "response": {"inlinedResponses": {"inlinedResponses": items}},
    }
    return Mock({("GET", "/batches/b1"): httpx.Response(200, json=operation)})


def oai_row(status: int, body: Any) -> dict[str, Any]:
    return {"custom_id": "a", "response": {"status_code": status, "body": body}, "error": None}


def ant_error(kind: str) -> dict[str, Any]:
    return {
        "custom_id": "a",
        "result": {"type": "errored", "error": {"type": "error", "error": {"type": kind, "message": "m"}}},
    }


def gem_error(code: int) -> dict[str, Any]:
    return {"error": {"code": code, "message": "m"}, "metadata": {"custom_id": "a"}}


# (provider, the results the provider serves, expected state, error code, retryable)
LINE_CASES: list[tuple[str, Callable[[], Mock], str, str, bool]] = [
    (
        "openai",
        lambda: openai_results([oai_row(400, {"error": {"type": "invalid_request_error", "message": "m"}})]),
        "errored",
        "provider_error",
        False,
    ),
    ("openai", lambda: openai_results([oai_row(429, {"error": {"message": "m"}})]), "errored", "provider_error", True),
    (
        "openai",
        lambda: openai_results([oai_row(500, {"error": {"type": "server_error", "message": "m"}})]),
        "errored",
        "provider_error",
        True,
    ),
    ("openai", lambda: openai_results([oai_row(200, {"choices": []})]), "errored", "provider_error", True),
    (
        "openai",
        lambda: openai_results(
            [{"custom_id": "a", "response": None, "error": {"code": "batch_expired", "message": "m"}}], "expired"
        ),
        "expired",
        "provider_error",
        True,
    ),
    ("openai", lambda: openai_results([], "failed"), "failed", "provider_error", True),
    ("anthropic", lambda: anthropic_results([ant_error("invalid_request_error")]), "errored", "provider_error", False),
    ("anthropic", lambda: anthropic_results([ant_error("overloaded_error")]), "errored", "provider_error", True),
    ("anthropic", lambda: anthropic_results([ant_error("rate_limit_error")]), "errored", "provider_error", True),
    (
        "anthropic",
        lambda: anthropic_results([{"custom_id": "a", "result": {"type": "expired"}}]),
        "expired",
        "provider_error",
        True,
    ),
    (
        "anthropic",
        lambda: anthropic_results([{"custom_id": "a", "result": {"type": "canceled"}}]),
        "cancelled",
        "provider_error",
        True,
    ),
    (
        "anthropic",
        lambda: anthropic_results([{"custom_id": "a", "result": {"type": "succeeded", "message": {"content": "x"}}}]),
        "errored",
        "provider_error",
        True,
    ),
    ("google", lambda: gemini_results([gem_error(3)]), "errored", "provider_error", False),
    ("google", lambda: gemini_results([gem_error(8)]), "errored", "provider_error", True),
    ("google", lambda: gemini_results([gem_error(13)]), "errored", "provider_error", True),
    ("google", lambda: gemini_results([gem_error(1)]), "cancelled", "provider_error", True),
    (
        "google",
        lambda: gemini_results([{"response": {"promptFeedback": {"blockReason": "SAFETY"}}}]),
        "errored",
        "provider_error",
        False,
    ),
    ("google", lambda: gemini_results([]), "errored", "provider_error", True),  # completed, yet no result for "a"
]


@pytest.mark.parametrize(("provider", "mock", "state", "code", "retryable"), LINE_CASES)
async def test_result_lines_map_to_typed_errors(
    provider: str, mock: Callable[[], Mock], state: str, code: str, retryable: bool
) -> None:
    served = mock()
    (line,) = await adapter(provider, served).results(handle_for(provider, "a"))
    assert isinstance(line, BatchLine) and line.custom_id == "a" and line.state == state
    assert line.error is not None and (line.error.code, line.error.retryable) == (code, retryable)
    assert KEY not in line.error.message


@pytest.mark.parametrize(
    ("provider", "batch", "state"),
    [
        ("openai", {"status": "finalizing"}, "in_progress"),
        ("openai", {"status": "cancelling"}, "in_progress"),
        ("openai", {"status": "expired"}, "expired"),
        ("anthropic", {"processing_status": "canceling"}, "in_progress"),
        ("anthropic", {"processing_status": "ended", "cancel_initiated_at": "2025-01-01T00:00:00Z"}, "cancelled"),
        ("anthropic", {"processing_status": "ended", "request_counts": {"expired": 2, "succeeded": 1}}, "expired"),
        ("anthropic", {"processing_status": "ended", "request_counts": {"succeeded": 3}}, "ended"),
        ("google", {"metadata": {"state": "BATCH_STATE_RUNNING"}}, "in_progress"),
        ("google", {"metadata": {"state": "JOB_STATE_SUCCEEDED"}}, "ended"),
        ("google", {"metadata": {"state": "BATCH_STATE_EXPIRED"}}, "expired"),
    ],
)
async def test_poll_maps_each_provider_status(provider: str, batch: dict[str, Any], state: str) -> None:
    mock = Mock({("GET", "/b1"): httpx.Response(200, json=batch)})
    assert (await adapter(provider, mock).poll(handle_for(provider))).state == state


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_status_we_cannot_read_is_retryable(provider: str) -> None:
    mock = Mock(
        {("GET", "/b1"): httpx.Response(200, json={"status": "paused", "processing_status": "x", "metadata": {}})}
    )
    with pytest.raises(ProviderUnavailable, match="malformed"):
        await adapter(provider, mock).poll(handle_for(provider))


async def test_openai_failed_batch_with_a_bad_input_is_permanent() -> None:
    errors = {"data": [{"code": "invalid_json_line", "message": "not JSON", "line": 2}]}
    mock = Mock({("GET", "/batches/b1"): httpx.Response(200, json={"status": "failed", "errors": errors})})
    status = await adapter("openai", mock).poll(handle_for("openai"))
    assert status.state == "failed" and status.error is not None and not status.error.retryable
    assert "invalid_json_line" in status.error.message and "line 2" in status.error.message


async def test_a_results_file_we_cannot_read_is_retryable() -> None:
    mock = openai_results([])
    mock.routes[("GET", "/files/file-out/content")] = httpx.Response(200, content=b'{"custom_id": "a"}\nnot json\n')
    with pytest.raises(ProviderUnavailable, match="line 2"):
        await adapter("openai", mock).results(handle_for("openai", "a"))


def test_batch_adapters_follow_the_provider_configs() -> None:
    configs = provider_configs({"FAREBOX_PROVIDERS_EXTRA": "vllm=http://localhost:8000/v1"}, emulator_url="http://e")
    client = httpx.AsyncClient()
    built = {name: build_batch_adapter(config, client) for name, config in configs.items()}
    assert isinstance(built["openai"], OpenAIBatchAdapter) and isinstance(built["anthropic"], AnthropicBatchAdapter)
    assert isinstance(built["google"], GeminiBatchAdapter) and built["vllm"] is None
