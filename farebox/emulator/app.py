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
from functools import partial
from typing import Any, Literal
from urllib.parse import parse_qsl

from farebox.emulator import batch_anthropic, batch_gemini, batch_openai
from farebox.emulator.batches import BatchCall, BatchStore
from farebox.emulator.knobs import EmulatorKnobs
from farebox.emulator.outcomes import Outcome, OutcomeBook, load_outcomes
from farebox.emulator.replies import NOT_FOUND, Reply, json_reply, not_allowed
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
    batches: BatchStore = field(init=False)

    def __post_init__(self) -> None:
        # Two streams, so turning latency on does not change which requests fail.
        self.fault_rng = random.Random(self.knobs.seed)
        self.latency_rng = random.Random(None if self.knobs.seed is None else self.knobs.seed + 1)
        # Read at startup, so a bad file stops the emulator before it listens (InvalidRequest).
        self.outcomes = load_outcomes(self.knobs.outcomes) if self.knobs.outcomes else None
        self.batches = BatchStore(self.knobs, partial(_batch_answer, self))

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


def _batch_answer(state: EmulatorState, provider: str, prompt: Prompt) -> Answer:
    """A batch request's answer: the sync endpoint's, counted the same way under the outcomes knob."""
    answer, outcome = _choose_answer(state, provider, prompt)
    if outcome is not None:
        state.outcome_counts[outcome] += 1
    return answer


async def _provider_call(
    state: EmulatorState, raw: bytes, wire: Wire, provider: str, path_model: str | None = None
) -> Reply:
    state.in_flight += 1
    state.peak_in_flight = max(state.peak_in_flight, state.in_flight)
    try:
        return await _answer(state, raw, wire, provider, path_model)
    finally:
        state.in_flight -= 1


async def _gemini(
    state: EmulatorState, raw: bytes, provider: str, target: str, batch_call: Callable[[], BatchCall]
) -> Reply:
    # "{model}:generateContent" is one path segment; the action follows the last colon.
    model, _, action = target.rpartition(":")
    if action == "batchGenerateContent" and model:
        return batch_gemini.create(state.batches, batch_call(), model)
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
    batches = state.batches.stats()
    if batches is not None:  # only once a batch API was used, so chat-only runs see the same stats
        payload["batches"] = batches
    return json_reply(payload)


def _reset(state: EmulatorState) -> Reply:
    state.requests.clear()
    state.faults.clear()
    state.outcome_counts.clear()
    state.batches.reset()
    state.peak_in_flight = state.in_flight
    return json_reply({"requests": {}, "faults": {}})


# --- routing ---------------------------------------------------------------------------------
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


async def route(state: EmulatorState, method: str, path: str, raw: bytes, scope: Scope | None = None) -> Reply:
    """The reply to one request; the batch APIs also read the query string and headers from ``scope``."""
    service = SERVICE_ROUTES.get(path)
    if service is not None:
        methods, handler = service
        return handler(state) if method in methods else not_allowed(", ".join(methods))
    found = match_provider(path)
    if found is None:
        reply = _batch_route(state, method, path, raw, scope)
        return NOT_FOUND if reply is None else reply
    if method != "POST":
        return not_allowed("POST")
    wire, provider, target = found
    if target is not None:
        prefix = "" if path.startswith(GEMINI_PREFIX) else "/" + provider
        return await _gemini(
            state, raw, provider, target, lambda: _batch_call(method, path, prefix, provider, raw, scope)
        )
    return await _provider_call(state, raw, wire, provider)


# (default provider, the path roots it owns, its handler), tried only once no chat route matched,
# so the chat hot path pays nothing for them.
BatchHandler = Callable[[BatchStore, BatchCall], Reply | None]
BATCH_APIS: tuple[tuple[str, tuple[str, ...], BatchHandler], ...] = (
    ("openai", ("/v1/files", "/v1/batches"), batch_openai.handle),
    ("anthropic", (batch_anthropic.BASE,), batch_anthropic.handle),
    ("google", (batch_gemini.BASE,), batch_gemini.handle),
)


def _batch_route(state: EmulatorState, method: str, path: str, raw: bytes, scope: Scope | None) -> Reply | None:
    """The reply for a batch API route, or None; provider prefixes as in match_provider."""
    first, _, rest = path[1:].partition("/")
    for prefix, tail in (("", path), ("/" + first, "/" + rest)):
        if prefix == "/":
            break
        for default, roots, handler in BATCH_APIS:
            if any(tail == root or tail.startswith(root + "/") for root in roots):
                call = _batch_call(method, tail, prefix, first if prefix else default, raw, scope)
                return handler(state.batches, call)
    return None


def _batch_call(method: str, tail: str, prefix: str, provider: str, raw: bytes, scope: Scope | None) -> BatchCall:
    scope = scope or {}
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
    host = headers.get("host")
    if not host:
        server = scope.get("server") or ("127.0.0.1", 8099)
        host = f"{server[0]}:{server[1]}"
    query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
    origin = f"{scope.get('scheme', 'http')}://{host}"
    return BatchCall(method, tail, prefix, provider, raw, query, headers.get("content-type", ""), origin)


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
        reply = await route(self.state, scope["method"], scope["path"], b"".join(chunks), scope)
        headers = [
            (b"content-type", reply.content_type),
            (b"content-length", str(len(reply.body)).encode()),
            *reply.headers,
        ]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})
