"""The emulator's HTTP surface: three provider wire formats, fault injection and stats.

The provider name is the first path segment (``/openai/v1/chat/completions``), so one emulator
can stand in for several providers at once and the stats can say which one was called. The wire
format follows from the route, so any name works (``/vllm/v1/chat/completions`` speaks OpenAI).

It is a bare ASGI callable with a small router rather than a Starlette app: the emulator shares
the cores with the pipeline in every benchmark, and Starlette's middleware, routing and
request/response objects were about a third of its CPU per request (README, Benchmarks).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal

from farebox.emulator.knobs import EmulatorKnobs
from farebox.emulator.outcomes import Outcome, OutcomeBook, load_outcomes
from farebox.emulator.text import Answer, fake_answer
from farebox.emulator.wire import (
    STATUS,
    AnthropicWire,
    BadRequest,
    ErrorKind,
    GeminiWire,
    OpenAIWire,
    Prompt,
    Wire,
)
from farebox.tokens import count_messages, count_text

Fault = Literal["fail", "rate_limit", "timeout", "malformed", "truncated"]
FAULT_ORDER: tuple[Fault, ...] = ("fail", "rate_limit", "timeout", "malformed", "truncated")

OPENAI, ANTHROPIC, GEMINI = OpenAIWire(), AnthropicWire(), GeminiWire()

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass
class EmulatorState:
    knobs: EmulatorKnobs
    requests: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    peak_in_flight: int = 0  # the most requests open at once: what a client's I/O concurrency reached
    # Set on shutdown so hung "timeout" requests give up and the server can stop promptly.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    outcome_counts: Counter[str] = field(default_factory=Counter)  # right / wrong / unmatched
    fault_rng: random.Random = field(init=False)
    latency_rng: random.Random = field(init=False)
    outcomes: OutcomeBook | None = field(init=False)

    def __post_init__(self) -> None:
        # Two streams, so turning latency on does not change which requests fail.
        self.fault_rng = random.Random(self.knobs.seed)
        self.latency_rng = random.Random(None if self.knobs.seed is None else self.knobs.seed + 1)
        # Read at startup, so a bad file stops the emulator before it listens (InvalidRequest).
        self.outcomes = load_outcomes(self.knobs.outcomes) if self.knobs.outcomes else None

    def draw_fault(self, provider: str) -> Fault | None:
        knobs = self.knobs
        if knobs.fault_total <= 0 or not knobs.faults_apply_to(provider):
            return None
        draw = self.fault_rng.random()
        rates = (knobs.fail_rate, knobs.rate_limit_rate, knobs.timeout_rate, knobs.malformed_rate, knobs.truncated_rate)
        edge = 0.0
        for kind, rate in zip(FAULT_ORDER, rates, strict=True):
            edge += rate
            if draw < edge:
                return kind
        return None

    def latency_s(self) -> float:
        mean = self.knobs.latency_ms / 1000.0
        # Uniform +-50% around the mean: some spread, but never a pathological tail.
        return mean * self.latency_rng.uniform(0.5, 1.5) if mean > 0 else 0.0


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: bytes = b"application/json"
    headers: tuple[tuple[bytes, bytes], ...] = ()


def json_reply(payload: Any, status: int = 200, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Reply:
    # Compact UTF-8, as the real APIs send (and byte for byte what Starlette's JSONResponse wrote).
    body = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    return Reply(status, body, headers=headers)


def _error(
    wire: Wire, kind: ErrorKind, message: str, param: str | None = None, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> Reply:
    return json_reply(wire.error(kind, message, param), STATUS[kind], headers)


async def _answer(state: EmulatorState, raw: bytes, wire: Wire, provider: str, path_model: str | None) -> Reply:
    try:
        body: Any = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        state.faults["bad_request"] += 1
        return _error(wire, "invalid", "the request body is not valid JSON")
    try:
        prompt = wire.parse(body, path_model)
    except BadRequest as exc:
        state.faults["bad_request"] += 1
        return _error(wire, "invalid", exc.message, exc.param)

    state.requests[f"{provider}/{prompt.model}"] += 1
    fault = state.draw_fault(provider)
    if fault is not None:
        state.faults[fault] += 1
    delay = state.latency_s()
    if delay > 0:
        await asyncio.sleep(delay)

    if fault == "fail":
        return _error(wire, "server", "emulated server error; please retry")
    if fault == "rate_limit":
        seconds = state.knobs.retry_after_s
        headers = (
            # Retry-After is whole seconds by RFC 9110; the -ms header (as OpenAI sends) is exact.
            (b"retry-after", str(math.ceil(seconds)).encode()),
            (b"retry-after-ms", str(round(seconds * 1000)).encode()),
        )
        return _error(wire, "rate_limit", "emulated rate limit; retry later", headers=headers)
    if fault == "timeout":
        try:
            await asyncio.wait_for(state.stopping.wait(), timeout=state.knobs.hang_s)
        except TimeoutError:
            pass
        return _error(wire, "unavailable", "emulator shutting down")

    answer, outcome = _choose_answer(state, provider, prompt)
    payload = wire.render(prompt, answer, count_messages(prompt.pairs))
    if fault == "malformed":
        return Reply(200, b"<html>emulated proxy hiccup</html>")
    reply = json_reply(payload)
    if fault == "truncated":
        return Reply(200, reply.body[: len(reply.body) // 2])
    if outcome is not None:  # counted only for answers that arrive whole
        state.outcome_counts[outcome] += 1
    return reply


def _choose_answer(state: EmulatorState, provider: str, prompt: Prompt) -> tuple[Answer, Outcome | None]:
    """The answer, and how it counts when the outcomes knob is set: the recorded label (or a wrong
    answer) for a labelled prompt, else the usual fake answer."""
    if state.outcomes is None:
        return fake_answer(prompt.model, prompt.pairs, prompt.max_tokens), None
    text, outcome = state.outcomes.answer(provider, prompt.model, prompt.pairs)
    if text is None:
        return fake_answer(prompt.model, prompt.pairs, prompt.max_tokens), outcome
    # The exact text, even past max_tokens: a cut label would grade as wrong.
    return Answer(text=text, tokens=count_text(text), hit_limit=False), outcome


async def _provider_call(
    state: EmulatorState, raw: bytes, wire: Wire, provider: str, path_model: str | None = None
) -> Reply:
    state.in_flight += 1
    state.peak_in_flight = max(state.peak_in_flight, state.in_flight)
    try:
        return await _answer(state, raw, wire, provider, path_model)
    finally:
        state.in_flight -= 1


async def _gemini(state: EmulatorState, raw: bytes, provider: str, target: str) -> Reply:
    # "{model}:generateContent" is one path segment; the action follows the last colon.
    model, _, action = target.rpartition(":")
    if action != "generateContent" or not model:
        kind: ErrorKind = "invalid" if action == "streamGenerateContent" else "not_found"
        message = f"the emulator only implements models/{{model}}:generateContent, not {action!r}"
        return _error(GEMINI, kind, message)
    return await _provider_call(state, raw, GEMINI, provider, model)


def _stats(state: EmulatorState) -> Reply:
    payload: dict[str, Any] = {
        "requests": dict(state.requests),
        "faults": dict(state.faults),
        "in_flight": state.in_flight,
        "peak_in_flight": state.peak_in_flight,
    }
    if state.outcomes is not None:
        payload["outcomes"] = {kind: state.outcome_counts[kind] for kind in ("right", "wrong", "unmatched")}
    return json_reply(payload)


def _reset(state: EmulatorState) -> Reply:
    state.requests.clear()
    state.faults.clear()
    state.outcome_counts.clear()
    state.peak_in_flight = state.in_flight
    return json_reply({"requests": {}, "faults": {}})


# --- routing ---------------------------------------------------------------------------------
NOT_FOUND = Reply(404, b"Not Found", b"text/plain; charset=utf-8")


def _not_allowed(allow: str) -> Reply:
    return Reply(405, b"Method Not Allowed", b"text/plain; charset=utf-8", ((b"allow", allow.encode()),))


GEMINI_PREFIX = "/v1beta/models/"


def match_provider(path: str) -> tuple[Wire, str, str | None] | None:
    """(wire format, provider name, Gemini's "{model}:{action}" segment) for a provider route.
    Unprefixed paths first (named as the real APIs' providers), then "/{provider}/..."."""
    first, _, rest = path[1:].partition("/")
    for provider, tail in ((None, path), (first, "/" + rest)):
        if provider == "":
            break
        if tail == "/v1/chat/completions":
            return OPENAI, provider or "openai", None
        if tail == "/v1/messages":
            return ANTHROPIC, provider or "anthropic", None
        target = tail.removeprefix(GEMINI_PREFIX)
        if target != tail and target and "/" not in target:
            return GEMINI, provider or "google", target
    return None


def _health(state: EmulatorState) -> Reply:
    return json_reply({"status": "ok"})


# path -> (the methods it answers, its handler). A GET route answers HEAD too (uvicorn leaves the
# body out), as Starlette's did: curl -I works.
_READ = ("GET", "HEAD")
SERVICE_ROUTES: dict[str, tuple[tuple[str, ...], Callable[[EmulatorState], Reply]]] = {
    "/healthz": (_READ, _health),
    "/_emulator/stats": (_READ, _stats),
    "/_emulator/reset": (("POST",), _reset),
}


async def route(state: EmulatorState, method: str, path: str, raw: bytes) -> Reply:
    """The reply to one request."""
    service = SERVICE_ROUTES.get(path)
    if service is not None:
        methods, handler = service
        return handler(state) if method in methods else _not_allowed(", ".join(methods))
    found = match_provider(path)
    if found is None:
        return NOT_FOUND
    if method != "POST":
        return _not_allowed("POST")
    wire, provider, target = found
    if target is not None:
        return await _gemini(state, raw, provider, target)
    return await _provider_call(state, raw, wire, provider)


class EmulatorApp:
    """The ASGI application uvicorn serves."""

    def __init__(self, knobs: EmulatorKnobs) -> None:
        self.state = EmulatorState(knobs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        reply = await route(self.state, scope["method"], scope["path"], b"".join(chunks))
        headers = [
            (b"content-type", reply.content_type),
            (b"content-length", str(len(reply.body)).encode()),
            *reply.headers,
        ]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})
