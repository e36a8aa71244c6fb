"""The emulator's HTTP surface: three provider wire formats, fault injection and stats.

The provider name is the first path segment (``/openai/v1/chat/completions``), so one emulator
can stand in for several providers at once and the stats can say which one was called. The wire
format follows from the route, so any name works (``/vllm/v1/chat/completions`` speaks OpenAI).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from farebox.emulator.knobs import EmulatorKnobs
from farebox.emulator.text import fake_answer
from farebox.emulator.wire import STATUS, AnthropicWire, BadRequest, ErrorKind, GeminiWire, OpenAIWire, Wire
from farebox.tokens import count_messages

Fault = Literal["fail", "rate_limit", "timeout", "malformed", "truncated"]
FAULT_ORDER: tuple[Fault, ...] = ("fail", "rate_limit", "timeout", "malformed", "truncated")

OPENAI, ANTHROPIC, GEMINI = OpenAIWire(), AnthropicWire(), GeminiWire()


@dataclass
class EmulatorState:
    knobs: EmulatorKnobs
    requests: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    peak_in_flight: int = 0  # the most requests open at once: what a client's I/O concurrency reached
    # Set on shutdown so hung "timeout" requests give up and the server can stop promptly.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    fault_rng: random.Random = field(init=False)
    latency_rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        # Two streams, so turning latency on does not change which requests fail.
        self.fault_rng = random.Random(self.knobs.seed)
        self.latency_rng = random.Random(None if self.knobs.seed is None else self.knobs.seed + 1)

    def draw_fault(self, provider: str) -> Fault | None:
        knobs = self.knobs
        if knobs.fault_total <= 0 or not knobs.faults_apply_to(provider):
            return None
        draw = self.fault_rng.random()
        rates = (knobs.fail_rate, knobs.rate_limit_rate, knobs.timeout_rate, knobs.malformed_rate,
                 knobs.truncated_rate)
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


def _state(request: Request) -> EmulatorState:
    state: EmulatorState = request.app.state.emulator
    return state


def _error(wire: Wire, kind: ErrorKind, message: str, param: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(wire.error(kind, message, param), status_code=STATUS[kind], headers=headers)


async def _handle(request: Request, wire: Wire, provider: str, path_model: str | None = None) -> Response:
    state = _state(request)
    state.in_flight += 1
    state.peak_in_flight = max(state.peak_in_flight, state.in_flight)
    try:
        return await _answer(request, state, wire, provider, path_model)
    finally:
        state.in_flight -= 1


async def _answer(request: Request, state: EmulatorState, wire: Wire, provider: str,
                  path_model: str | None) -> Response:
    try:
        body: Any = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
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
        headers = {
            # Retry-After is whole seconds by RFC 9110; the -ms header (as OpenAI sends) is exact.
            "retry-after": str(math.ceil(seconds)),
            "retry-after-ms": str(round(seconds * 1000)),
        }
        return _error(wire, "rate_limit", "emulated rate limit; retry later", headers=headers)
    if fault == "timeout":
        try:
            await asyncio.wait_for(state.stopping.wait(), timeout=state.knobs.hang_s)
        except TimeoutError:
            pass
        return _error(wire, "unavailable", "emulator shutting down")

    answer = fake_answer(prompt.model, prompt.pairs, prompt.max_tokens)
    payload = wire.render(prompt, answer, count_messages(prompt.pairs))
    if fault == "malformed":
        return Response(b"<html>emulated proxy hiccup</html>", media_type="application/json")
    if fault == "truncated":
        raw = json.dumps(payload).encode()
        return Response(raw[: len(raw) // 2], media_type="application/json")
    return JSONResponse(payload)


# --- routes ----------------------------------------------------------------------------------
async def openai_chat(request: Request) -> Response:
    return await _handle(request, OPENAI, request.path_params.get("provider", "openai"))


async def anthropic_messages(request: Request) -> Response:
    return await _handle(request, ANTHROPIC, request.path_params.get("provider", "anthropic"))


async def gemini_generate(request: Request) -> Response:
    provider = request.path_params.get("provider", "google")
    # "{model}:generateContent" is one path segment; the action follows the last colon.
    model, _, action = request.path_params["target"].rpartition(":")
    if action != "generateContent" or not model:
        kind: ErrorKind = "invalid" if action == "streamGenerateContent" else "not_found"
        message = f"the emulator only implements models/{{model}}:generateContent, not {action!r}"
        return _error(GEMINI, kind, message)
    return await _handle(request, GEMINI, provider, model)


async def stats(request: Request) -> Response:
    state = _state(request)
    return JSONResponse({"requests": dict(state.requests), "faults": dict(state.faults),
                         "in_flight": state.in_flight, "peak_in_flight": state.peak_in_flight})


async def reset(request: Request) -> Response:
    state = _state(request)
    state.requests.clear()
    state.faults.clear()
    state.peak_in_flight = state.in_flight
    return JSONResponse({"requests": {}, "faults": {}})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def create_app(knobs: EmulatorKnobs) -> Starlette:
    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/_emulator/stats", stats, methods=["GET"]),
        Route("/_emulator/reset", reset, methods=["POST"]),
        # Unprefixed paths first: they have fewer segments, so they never shadow prefixed ones.
        Route("/v1/chat/completions", openai_chat, methods=["POST"]),
        Route("/v1/messages", anthropic_messages, methods=["POST"]),
        Route("/v1beta/models/{target}", gemini_generate, methods=["POST"]),
        Route("/{provider}/v1/chat/completions", openai_chat, methods=["POST"]),
        Route("/{provider}/v1/messages", anthropic_messages, methods=["POST"]),
        Route("/{provider}/v1beta/models/{target}", gemini_generate, methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    app.state.emulator = EmulatorState(knobs)
    return app
