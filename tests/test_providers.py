"""Provider adapters against httpx.MockTransport: the request each one sends, the reply it reads,
and how every HTTP outcome maps onto farebox's error tree."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from farebox.errors import InvalidRequest, ProviderRejected, ProviderUnavailable, RateLimited, RetryableError
from farebox.providers.anthropic import AnthropicAdapter
from farebox.providers.base import ProviderAdapter, ProviderRequest, retry_after_s
from farebox.providers.gemini import GeminiAdapter
from farebox.providers.openai import OpenAIAdapter
from farebox.schemas import ChatMessage
from farebox.tokens import count_messages, count_text

KEY = "sk-test-SECRET-0123456789abcdef"
PROMPT = "the secret plan is on page nine"

OPENAI_OK = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
    "usage": {
        "prompt_tokens": 21,
        "completion_tokens": 5,
        "total_tokens": 26,
        "prompt_tokens_details": {"cached_tokens": 16},
    },
}
ANTHROPIC_OK = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-3-5-haiku-20241022",
    "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 10, "output_tokens": 4, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 2},
}
GEMINI_OK = {
    "candidates": [{"content": {"role": "model", "parts": [{"text": "hello"}]}, "finishReason": "STOP", "index": 0}],
    "usageMetadata": {
        "promptTokenCount": 12,
        "candidatesTokenCount": 3,
        "totalTokenCount": 15,
        "cachedContentTokenCount": 8,
        "thoughtsTokenCount": 2,
    },
    "modelVersion": "gemini-2.0-flash-001",
}

Handler = Callable[[httpx.Request], httpx.Response]


def request(
    *messages: tuple[str, str], model: str = "m", max_tokens: int = 50, temperature: float = 0.3
) -> ProviderRequest:
    msgs = messages or (("user", PROMPT),)
    return ProviderRequest(
        model=model,
        messages=tuple(ChatMessage(role=r, content=c) for r, c in msgs),
        max_tokens=max_tokens,
        temperature=temperature,
        timeout_s=5.0,
    )


class Capture:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    def __call__(self, req: httpx.Request) -> httpx.Response:
        self.requests.append(req)
        return self.handler(req)

    @property
    def body(self) -> Any:
        return json.loads(self.requests[-1].content)


def make(kind: str, handler: Handler) -> tuple[ProviderAdapter, Capture]:
    capture = Capture(handler)
    client = httpx.AsyncClient(transport=httpx.MockTransport(capture))
    adapters: dict[str, ProviderAdapter] = {
        "openai": OpenAIAdapter(client, "https://api.example/v1", KEY),
        "compat": OpenAIAdapter(client, "http://vllm.local/v1/", None, name="vllm", compatible=True),
        "anthropic": AnthropicAdapter(client, "https://anthropic.example/v1", KEY),
        "gemini": GeminiAdapter(client, "https://gemini.example/v1beta", KEY),
    }
    return adapters[kind], capture


def ok(body: Any) -> Handler:
    return lambda req: httpx.Response(200, json=body)


# --- requests and replies --------------------------------------------------------------------
async def test_openai_request_and_reply() -> None:
    adapter, cap = make("openai", ok(OPENAI_OK))
    reply = await adapter.complete(request(("system", "be brief"), ("user", PROMPT), model="gpt-4o-mini"))
    sent = cap.requests[0]
    assert str(sent.url) == "https://api.example/v1/chat/completions"
    assert sent.method == "POST"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert cap.body == {
        "model": "gpt-4o-mini",
        "max_completion_tokens": 50,
        "temperature": 0.3,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}],
    }
    assert reply.content == "hello"
    assert reply.model == "gpt-4o-mini-2024-07-18"
    assert reply.usage_reported
    assert (reply.usage.input_tokens, reply.usage.output_tokens, reply.usage.cached_input_tokens) == (21, 5, 16)


async def test_openai_reasoning_model_gets_no_temperature() -> None:
    adapter, cap = make("openai", ok(OPENAI_OK))
    await adapter.complete(request(model="o3-mini"))
    assert "temperature" not in cap.body
    assert cap.body["max_completion_tokens"] == 50


async def test_openai_compatible_without_key() -> None:
    adapter, cap = make("compat", ok(OPENAI_OK))
    assert adapter.name == "vllm"
    await adapter.complete(request(model="llama3"))
    sent = cap.requests[0]
    assert str(sent.url) == "http://vllm.local/v1/chat/completions"
    assert "authorization" not in sent.headers
    assert cap.body["max_tokens"] == 50 and "max_completion_tokens" not in cap.body


async def test_anthropic_request_and_reply() -> None:
    adapter, cap = make("anthropic", ok(ANTHROPIC_OK))
    reply = await adapter.complete(
        request(
            ("system", "be brief"),
            ("user", "a"),
            ("user", "b"),
            ("assistant", "c"),
            ("system", "no lists"),
            ("user", "d"),
            model="claude-3-5-haiku-latest",
            temperature=1.7,
        )
    )
    sent = cap.requests[0]
    assert str(sent.url) == "https://anthropic.example/v1/messages"
    assert sent.headers["x-api-key"] == KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent.headers
    assert cap.body == {
        "model": "claude-3-5-haiku-latest",
        "max_tokens": 50,
        "temperature": 1.0,
        "system": "be brief\n\nno lists",
        "messages": [
            {"role": "user", "content": "a\n\nb"},
            {"role": "assistant", "content": "c"},
            {"role": "user", "content": "d"},
        ],
    }
    assert reply.content == "hello"
    # Anthropic's input_tokens exclude cache reads and writes; ours are the whole prompt.
    assert (reply.usage.input_tokens, reply.usage.output_tokens, reply.usage.cached_input_tokens) == (42, 4, 30)


async def test_anthropic_without_system_omits_field() -> None:
    adapter, cap = make("anthropic", ok(ANTHROPIC_OK))
    await adapter.complete(request())
    assert "system" not in cap.body


@pytest.mark.parametrize("kind", ["anthropic", "gemini"])
async def test_only_system_messages_is_invalid(kind: str) -> None:
    adapter, cap = make(kind, ok({}))
    with pytest.raises(InvalidRequest):
        await adapter.complete(request(("system", "hello")))
    assert cap.requests == []


async def test_gemini_request_and_reply() -> None:
    adapter, cap = make("gemini", ok(GEMINI_OK))
    reply = await adapter.complete(
        request(
            ("system", "be brief"),
            ("user", "a"),
            ("assistant", "b"),
            ("assistant", "c"),
            model="models/gemini-2.0-flash",
        )
    )
    sent = cap.requests[0]
    assert str(sent.url) == "https://gemini.example/v1beta/models/gemini-2.0-flash:generateContent"
    assert sent.headers["x-goog-api-key"] == KEY
    assert KEY not in str(sent.url)
    assert cap.body == {
        "contents": [
            {"role": "user", "parts": [{"text": "a"}]},
            {"role": "model", "parts": [{"text": "b"}, {"text": "c"}]},
        ],
        "systemInstruction": {"parts": [{"text": "be brief"}]},
        "generationConfig": {"maxOutputTokens": 50, "temperature": 0.3},
    }
    assert reply.content == "hello"
    assert reply.model == "gemini-2.0-flash-001"
    assert (reply.usage.input_tokens, reply.usage.output_tokens, reply.usage.cached_input_tokens) == (12, 5, 8)


async def test_gemini_blocked_prompt_is_rejected() -> None:
    adapter, _ = make("gemini", ok({"promptFeedback": {"blockReason": "SAFETY"}}))
    with pytest.raises(ProviderRejected, match="SAFETY"):
        await adapter.complete(request())


def _without_usage(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("openai", _without_usage(OPENAI_OK, "usage")),
        ("anthropic", _without_usage(ANTHROPIC_OK, "usage")),
        ("gemini", _without_usage(GEMINI_OK, "usageMetadata")),
    ],
)
async def test_missing_usage_is_counted_with_tiktoken(kind: str, body: dict[str, Any]) -> None:
    adapter, _ = make(kind, ok(body))
    reply = await adapter.complete(request())
    assert not reply.usage_reported
    assert reply.content == "hello"
    assert reply.usage.input_tokens == count_messages([("user", PROMPT)])
    assert reply.usage.output_tokens == count_text("hello")


# --- error mapping ---------------------------------------------------------------------------
def status(code: int, body: Any = None, headers: dict[str, str] | None = None) -> Handler:
    error = (
        body if body is not None else {"error": {"message": f"Incorrect API key provided: {KEY}", "type": "some_error"}}
    )
    return lambda req: httpx.Response(code, json=error, headers=headers)


def raises(exc: Exception) -> Handler:
    def handler(req: httpx.Request) -> httpx.Response:
        raise exc

    return handler


def raw(body: bytes) -> Handler:
    return lambda req: httpx.Response(200, content=body, headers={"content-type": "application/json"})


# Far ahead: the value is fixed at collection time and the test may run minutes later.
def in_an_hour(req: httpx.Request) -> httpx.Response:
    """A 429 whose Retry-After is an HTTP date an hour from when it is answered (not from collection: a
    long run would otherwise shrink the wait it finds)."""
    date = email.utils.formatdate(time.time() + 3600, usegmt=True)
    return status(429, headers={"retry-after": date})(req)


CASES: list[tuple[str, Handler, type[Exception], str]] = [
    ("429 seconds", status(429, headers={"retry-after": "7"}), RateLimited, "429"),
    ("429 date", in_an_hour, RateLimited, "429"),
    ("429 ms", status(429, headers={"retry-after-ms": "250", "retry-after": "1"}), RateLimited, "429"),
    ("500", status(500), ProviderUnavailable, "500"),
    ("503", status(503), ProviderUnavailable, "503"),
    (
        "529",
        status(529, {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}),
        ProviderUnavailable,
        "overloaded_error",
    ),
    ("408", status(408), ProviderUnavailable, "408"),
    ("400", status(400), ProviderRejected, "400"),
    ("401", status(401), ProviderRejected, "401"),
    ("404", status(404, {"error": "model 'x' not found"}), ProviderRejected, "not found"),
    (
        "gemini 400",
        status(400, {"error": {"code": 400, "message": "bad", "status": "INVALID_ARGUMENT"}}),
        ProviderRejected,
        "INVALID_ARGUMENT",
    ),
    ("timeout", raises(httpx.ReadTimeout("timed out")), ProviderUnavailable, "no answer"),
    ("connect", raises(httpx.ConnectError("connection refused")), ProviderUnavailable, "connection"),
    ("protocol", raises(httpx.RemoteProtocolError("peer closed")), ProviderUnavailable, "connection"),
    ("not json", raw(b"<html>oops</html>"), ProviderUnavailable, "malformed"),
    ("truncated", raw(json.dumps(OPENAI_OK).encode()[:60]), ProviderUnavailable, "malformed"),
    ("missing fields", raw(b'{"id": "x"}'), ProviderUnavailable, "malformed"),
]


@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini"])
@pytest.mark.parametrize(("case", "handler", "error", "text"), CASES, ids=[c[0] for c in CASES])
async def test_error_mapping(kind: str, case: str, handler: Handler, error: type[Exception], text: str) -> None:
    adapter, _ = make(kind, handler)
    with pytest.raises(error) as info:
        await adapter.complete(request())
    message = str(info.value)
    assert text in message
    assert message.startswith(adapter.name)
    assert KEY not in message and "SECRET" not in message
    assert PROMPT not in message
    assert len(message) < 400
    if case.startswith("429"):
        assert isinstance(info.value, RetryableError)
        expected = {"429 seconds": 7.0, "429 ms": 0.25}.get(case)
        after = info.value.retry_after_s
        assert after is not None
        if expected is not None:
            assert after == pytest.approx(expected)
        else:
            assert 3000 < after <= 3601


def test_retry_after_parsing() -> None:
    assert retry_after_s(httpx.Headers({"retry-after": "2.5"})) == 2.5
    assert retry_after_s(httpx.Headers({"retry-after": "soon"})) is None
    assert retry_after_s(httpx.Headers({})) is None
    past = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert retry_after_s(httpx.Headers({"retry-after": past})) == 0.0


async def test_long_provider_message_is_truncated() -> None:
    adapter, _ = make("openai", status(400, {"error": {"message": "x" * 5000, "type": "invalid_request_error"}}))
    with pytest.raises(ProviderRejected) as info:
        await adapter.complete(request())
    assert len(str(info.value)) < 300
    assert "invalid_request_error" in str(info.value)


async def test_unsupported_scheme_is_permanent() -> None:
    async with httpx.AsyncClient() as client:
        adapter = OpenAIAdapter(client, "ftp://nowhere/v1", KEY)
        with pytest.raises(ProviderRejected):
            await adapter.complete(request())


async def test_repr_hides_the_key() -> None:
    adapter, _ = make("anthropic", ok(ANTHROPIC_OK))
    assert KEY not in repr(adapter)
