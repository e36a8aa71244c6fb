"""The provider emulator over real HTTP on loopback: wire formats, validation, stats and knobs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pydantic
import pytest

from farebox.cli.emulator import add_commands, knobs_from_args
from farebox.emulator.app import ANTHROPIC, GEMINI, OPENAI, EmulatorApp, match_provider
from farebox.emulator.knobs import EmulatorKnobs
from farebox.emulator.server import running, serve
from farebox.tokens import count_messages

CHAT = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 2+2?"}],
    "max_tokens": 40,
}
MESSAGES = {
    "model": "claude-3-5-haiku-latest",
    "max_tokens": 40,
    "system": "be brief",
    "messages": [{"role": "user", "content": "What is 2+2?"}],
}
GENERATE = {
    "contents": [{"role": "user", "parts": [{"text": "What is 2+2?"}]}],
    "systemInstruction": {"parts": [{"text": "be brief"}]},
    "generationConfig": {"maxOutputTokens": 40, "temperature": 0.2},
}
PAIRS = [("system", "be brief"), ("user", "What is 2+2?")]


@contextlib.asynccontextmanager
async def emulator(**knobs: Any) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    async with running(EmulatorKnobs(port=0, **knobs)) as url, httpx.AsyncClient(base_url=url) as client:
        yield url, client


async def stats(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/_emulator/stats")
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


async def test_openai_chat_completion_shape() -> None:
    async with emulator() as (_, client):
        r = await client.post("/openai/v1/chat/completions", json=CHAT)
        assert r.status_code == 200
        body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "gpt-4o-mini" and isinstance(body["created"], int) and body["system_fingerprint"]
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert usage["prompt_tokens"] == count_messages(PAIRS)
    assert 0 < usage["completion_tokens"] <= 40
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0


async def test_anthropic_message_shape() -> None:
    async with emulator() as (_, client):
        body = (await client.post("/anthropic/v1/messages", json=MESSAGES)).json()
    assert body["type"] == "message" and body["id"].startswith("msg_") and body["role"] == "assistant"
    assert body["content"][0]["type"] == "text" and body["content"][0]["text"]
    assert body["stop_reason"] in {"end_turn", "max_tokens"} and body["stop_sequence"] is None
    usage = body["usage"]
    assert usage["input_tokens"] == count_messages(PAIRS)
    assert 0 < usage["output_tokens"] <= 40
    assert usage["cache_read_input_tokens"] == 0 and usage["cache_creation_input_tokens"] == 0


async def test_gemini_generate_content_shape() -> None:
    async with emulator() as (_, client):
        body = (await client.post("/google/v1beta/models/gemini-2.0-flash:generateContent", json=GENERATE)).json()
    candidate = body["candidates"][0]
    assert candidate["content"]["role"] == "model" and candidate["content"]["parts"][0]["text"]
    assert candidate["finishReason"] in {"STOP", "MAX_TOKENS"} and candidate["index"] == 0
    usage = body["usageMetadata"]
    assert usage["promptTokenCount"] == count_messages(PAIRS)
    assert 0 < usage["candidatesTokenCount"] <= 40
    assert usage["totalTokenCount"] == usage["promptTokenCount"] + usage["candidatesTokenCount"]
    assert body["modelVersion"] == "gemini-2.0-flash"


async def test_answers_are_deterministic_and_bounded() -> None:
    async with emulator() as (_, client):

        async def text(body: dict[str, Any]) -> str:
            r = await client.post("/openai/v1/chat/completions", json=body)
            return str(r.json()["choices"][0]["message"]["content"])

        first, again = await text(CHAT), await text(CHAT)
        other_model = await text({**CHAT, "model": "gpt-4o"})
        tiny = await client.post("/openai/v1/chat/completions", json={**CHAT, "max_tokens": 3})
    assert first == again
    assert other_model != first
    assert tiny.json()["usage"]["completion_tokens"] <= 3
    assert tiny.json()["choices"][0]["finish_reason"] == "length"


async def test_stats_count_per_provider_and_model_and_reset() -> None:
    async with emulator() as (_, client):
        await client.post("/openai/v1/chat/completions", json=CHAT)
        await client.post("/v1/chat/completions", json=CHAT)  # unprefixed: the default provider
        await client.post("/vllm/v1/chat/completions", json={**CHAT, "model": "llama3"})
        await client.post("/v1/messages", json=MESSAGES)
        await client.post("/v1beta/models/gemini-2.0-flash:generateContent", json=GENERATE)
        await client.post("/openai/v1/chat/completions", json={"model": "x"})  # invalid
        seen = await stats(client)
        reset = await client.post("/_emulator/reset")
        after = await stats(client)
        health = await client.get("/healthz")
    assert seen["requests"] == {
        "openai/gpt-4o-mini": 2,
        "vllm/llama3": 1,
        "anthropic/claude-3-5-haiku-latest": 1,
        "google/gemini-2.0-flash": 1,
    }
    assert seen["faults"] == {"bad_request": 1}
    assert reset.status_code == 200 and after == {"requests": {}, "faults": {}, "in_flight": 0, "peak_in_flight": 0}
    assert health.status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/openai/v1/chat/completions", {"messages": CHAT["messages"]}, "model"),
        ("/openai/v1/chat/completions", {"model": "m"}, "messages"),
        ("/openai/v1/chat/completions", {**CHAT, "stream": True}, "stream"),
        ("/openai/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens"),
        ("/openai/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ],
)
async def test_openai_validation_errors(path: str, body: dict[str, Any], param: str) -> None:
    async with emulator() as (_, client):
        r = await client.post(path, json=body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert "code" in error


@pytest.mark.parametrize(
    "body",
    [
        {k: v for k, v in MESSAGES.items() if k != "max_tokens"},
        {**MESSAGES, "messages": [{"role": "system", "content": "x"}]},
        {**MESSAGES, "temperature": 1.5},
    ],
)
async def test_anthropic_validation_errors(body: dict[str, Any]) -> None:
    async with emulator() as (_, client):
        r = await client.post("/anthropic/v1/messages", json=body)
    assert r.status_code == 400
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("target", "body", "code"),
    [
        ("gemini-2.0-flash:generateContent", {"contents": []}, 400),
        ("gemini-2.0-flash:generateContent", {"contents": [{"role": "bot", "parts": [{"text": "x"}]}]}, 400),
        ("gemini-2.0-flash:countTokens", GENERATE, 404),
    ],
)
async def test_gemini_validation_errors(target: str, body: dict[str, Any], code: int) -> None:
    async with emulator() as (_, client):
        r = await client.post(f"/google/v1beta/models/{target}", json=body)
    assert r.status_code == code
    assert r.json()["error"]["code"] == code and r.json()["error"]["status"]


async def test_body_that_is_not_json() -> None:
    async with emulator() as (_, client):
        r = await client.post("/openai/v1/chat/completions", content=b"{nope")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


async def test_latency_knob_delays_and_requests_overlap() -> None:
    async with emulator(latency_ms=300) as (_, client):
        started = time.monotonic()
        r = await client.post("/openai/v1/chat/completions", json=CHAT)
        single = time.monotonic() - started
        started = time.monotonic()
        replies = await asyncio.gather(*(client.post("/openai/v1/chat/completions", json=CHAT) for _ in range(40)))
        together = time.monotonic() - started
    assert r.status_code == 200 and all(x.status_code == 200 for x in replies)
    assert single >= 0.14  # the shortest draw is half the mean
    # One after the other would take at least 40 * 0.15 s = 6 s; overlapped it is about 0.5 s.
    assert together < 5.0


async def test_serve_runs_until_cancelled() -> None:
    ready = asyncio.Event()
    with socket_port() as port:
        pass
    task = asyncio.create_task(serve(EmulatorKnobs(port=port), ready=ready))
    await asyncio.wait_for(ready.wait(), 10)
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 15)
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/healthz")


@contextlib.contextmanager
def socket_port() -> Any:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_knobs_validate_rates() -> None:
    with pytest.raises(pydantic.ValidationError):
        EmulatorKnobs(fail_rate=0.7, timeout_rate=0.5)
    with pytest.raises(pydantic.ValidationError):
        EmulatorKnobs(fail_rate=-0.1)
    assert EmulatorKnobs(faulty=" OpenAI, google ,").faulty_providers == {"openai", "google"}


def test_command_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAREBOX_EMULATOR_LATENCY_MS", "25")
    monkeypatch.setenv("FAREBOX_EMULATOR_FAIL_RATE", "0.5")
    monkeypatch.setenv("FAREBOX_EMULATOR_PORT", "9001")
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["emulator", "--fail-rate", "0.1", "--faulty", "anthropic", "--host", "127.0.0.2"])
    knobs = knobs_from_args(args)
    assert callable(args.func)
    assert (knobs.latency_ms, knobs.fail_rate, knobs.faulty, knobs.port, knobs.host) == (
        25.0,
        0.1,
        "anthropic",
        9001,
        "127.0.0.2",
    )


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/chat/completions", ("openai", "openai", None)),
        ("/v1/messages", ("anthropic", "anthropic", None)),
        ("/v1beta/models/gemini-2.0-flash:generateContent", ("gemini", "google", "gemini-2.0-flash:generateContent")),
        ("/vllm/v1/chat/completions", ("openai", "vllm", None)),
        ("/claude/v1/messages", ("anthropic", "claude", None)),
        ("/vertex/v1beta/models/m:generateContent", ("gemini", "vertex", "m:generateContent")),
        ("/v1/v1/chat/completions", ("openai", "v1", None)),  # "v1" is a provider name like any other
        ("/v1beta/models/", None),
        ("/v1beta/models/a/b", None),
        ("/x/y/v1/chat/completions", None),
        ("//v1/chat/completions", None),
        ("/v1/chat/completions/", None),
        ("/healthz", None),
        ("/", None),
    ],
)
def test_provider_routes(path: str, expected: tuple[str, str, str | None] | None) -> None:
    found = match_provider(path)
    wires = {id(OPENAI): "openai", id(ANTHROPIC): "anthropic", id(GEMINI): "gemini"}
    assert (None if found is None else (wires[id(found[0])], found[1], found[2])) == expected


@pytest.mark.parametrize(
    ("method", "path", "code", "allow"),
    [
        ("GET", "/nowhere", 404, None),
        ("POST", "/openai/v2/chat/completions", 404, None),
        ("GET", "/openai/v1/chat/completions", 405, "POST"),
        ("PUT", "/v1/messages", 405, "POST"),
        ("POST", "/healthz", 405, "GET, HEAD"),
        ("DELETE", "/_emulator/stats", 405, "GET, HEAD"),
        ("GET", "/_emulator/reset", 405, "POST"),
        ("HEAD", "/_emulator/reset", 405, "POST"),
    ],
)
async def test_unknown_paths_and_wrong_methods(method: str, path: str, code: int, allow: str | None) -> None:
    async with emulator() as (_, client):
        r = await client.request(method, path, json=CHAT)
        after = await stats(client)
    assert r.status_code == code and r.headers.get("allow") == allow
    assert after["requests"] == {} and after["faults"] == {}


async def test_request_body_in_chunks() -> None:
    async def body() -> AsyncIterator[bytes]:  # no Content-Length: sent with chunked encoding
        raw = json.dumps(CHAT).encode()
        for i in range(0, len(raw), 7):
            yield raw[i : i + 7]

    async with emulator() as (_, client):
        r = await client.post("/openai/v1/chat/completions", content=body())
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == count_messages(PAIRS)


async def test_head_on_the_get_routes() -> None:
    async with emulator() as (_, client):
        replies = [await client.head(path) for path in ("/healthz", "/_emulator/stats")]
    assert [r.status_code for r in replies] == [200, 200] and all(r.content == b"" for r in replies)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "gpt-\\ud800", "messages": [{"role": "user", "content": "hi"}]}',  # a lone surrogate
        b"[" * 100_000,  # nested beyond the JSON parser's recursion limit
    ],
)
async def test_bodies_that_break_json_handling_get_a_400(raw: bytes) -> None:
    async with emulator() as (_, client):
        r = await client.post("/openai/v1/chat/completions", content=raw)
        after = await client.get("/_emulator/stats")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert after.status_code == 200 and after.json()["faults"] == {"bad_request": 1}


async def _call_app(messages: list[dict[str, Any]], scope_type: str = "http") -> tuple[EmulatorApp, list[Any]]:
    """Drive the ASGI app directly with scripted receive messages; returns what it sent."""
    app = EmulatorApp(EmulatorKnobs(port=0))
    inbox = iter(messages)
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return next(inbox)

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": scope_type, "method": "POST", "path": "/openai/v1/chat/completions"}
    await app(scope, receive, send)  # type: ignore[arg-type]
    return app, sent


async def test_asgi_body_in_several_messages() -> None:
    raw = json.dumps(CHAT).encode()
    parts = [
        {"type": "http.request", "body": raw[i : i + 9], "more_body": i + 9 < len(raw)} for i in range(0, len(raw), 9)
    ]
    app, sent = await _call_app(parts)
    assert sent[0]["status"] == 200 and json.loads(sent[1]["body"])["usage"]["prompt_tokens"] == count_messages(PAIRS)
    assert app.state.in_flight == 0


async def test_asgi_disconnect_while_reading_sends_nothing() -> None:
    app, sent = await _call_app(
        [{"type": "http.request", "body": b'{"mo', "more_body": True}, {"type": "http.disconnect"}]
    )
    assert sent == [] and app.state.in_flight == 0 and app.state.requests == {}


async def test_asgi_other_scopes_are_ignored() -> None:
    _, sent = await _call_app([], scope_type="lifespan")
    assert sent == []
