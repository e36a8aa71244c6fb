"""call_with_retries over MockTransport sequences: what is retried, how long it waits, and that a
deadline always wins."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from farebox.errors import DeadlineExceeded, ProviderRejected, ProviderUnavailable, RateLimited
from farebox.providers.base import ProviderRequest
from farebox.providers.openai import OpenAIAdapter
from farebox.providers.retry import call_with_retries
from farebox.schemas import ChatMessage

OK = {
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1},
}
REQUEST = ProviderRequest(
    model="m", messages=(ChatMessage(role="user", content="hi"),), max_tokens=5, temperature=0.0, timeout_s=30.0
)


class Script:
    """Answers with the given responses in order (the last one repeats) and records call times."""

    def __init__(self, *responses: httpx.Response | Exception) -> None:
        self.responses = list(responses)
        self.times: list[float] = []
        self.timeouts: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.times.append(time.monotonic())
        self.timeouts.append(request.extensions["timeout"]["read"])
        item = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
        if isinstance(item, Exception):
            raise item
        return item


def adapter(script: Script) -> OpenAIAdapter:
    return OpenAIAdapter(httpx.AsyncClient(transport=httpx.MockTransport(script)), "http://x/v1", "sk-k")


def ok() -> httpx.Response:
    return httpx.Response(200, json=OK)


async def test_retries_5xx_then_succeeds() -> None:
    script = Script(httpx.Response(503), httpx.Response(503), ok())
    seen: list[tuple[BaseException, float]] = []
    reply, retries = await call_with_retries(
        adapter(script), REQUEST, max_attempts=4, deadline_at=None, on_retry=lambda exc, wait: seen.append((exc, wait))
    )
    assert reply.content == "fine"
    assert retries == 2
    assert len(script.times) == 3
    assert [type(exc) for exc, _ in seen] == [ProviderUnavailable, ProviderUnavailable]
    assert all(0 <= wait <= 8 for _, wait in seen)


async def test_first_success_has_no_retries() -> None:
    reply, retries = await call_with_retries(adapter(Script(ok())), REQUEST, max_attempts=3, deadline_at=None)
    assert (reply.content, retries) == ("fine", 0)


async def test_4xx_is_not_retried() -> None:
    script = Script(httpx.Response(400, json={"error": {"message": "bad", "type": "invalid_request_error"}}), ok())
    with pytest.raises(ProviderRejected):
        await call_with_retries(adapter(script), REQUEST, max_attempts=5, deadline_at=None)
    assert len(script.times) == 1


async def test_gives_up_after_max_attempts_with_the_last_error() -> None:
    script = Script(httpx.Response(500), httpx.Response(502), httpx.Response(503))
    with pytest.raises(ProviderUnavailable, match="503"):
        await call_with_retries(adapter(script), REQUEST, max_attempts=3, deadline_at=None)
    assert len(script.times) == 3


async def test_retry_after_is_honoured() -> None:
    script = Script(httpx.Response(429, headers={"retry-after-ms": "300"}), ok())
    waits: list[float] = []
    reply, retries = await call_with_retries(
        adapter(script), REQUEST, max_attempts=3, deadline_at=None, on_retry=lambda exc, wait: waits.append(wait)
    )
    assert (reply.content, retries) == ("fine", 1)
    assert waits and waits[0] >= 0.3
    # It did wait: the second call came no sooner than the provider asked.
    assert script.times[1] - script.times[0] >= 0.29


async def test_deadline_cuts_the_per_call_timeout() -> None:
    script = Script(ok())
    await call_with_retries(adapter(script), REQUEST, max_attempts=3, deadline_at=time.time() + 2.0)
    assert 0 < script.timeouts[0] <= 2.0


async def test_deadline_stops_retries_without_sleeping_past_it() -> None:
    # The provider asks for 60 s; the deadline is 1 s away: give up now rather than sleep.
    script = Script(httpx.Response(429, headers={"retry-after": "60"}), ok())
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as info:
        await asyncio.wait_for(
            call_with_retries(adapter(script), REQUEST, max_attempts=5, deadline_at=time.time() + 1.0), 20
        )
    assert time.monotonic() - started < 15  # did not hang
    assert isinstance(info.value.__cause__, RateLimited)
    assert len(script.times) == 1


async def test_deadline_already_passed() -> None:
    script = Script(ok())
    with pytest.raises(DeadlineExceeded):
        await call_with_retries(adapter(script), REQUEST, max_attempts=3, deadline_at=time.time() - 1)
    assert script.times == []


async def test_hanging_provider_is_cut_by_the_deadline() -> None:
    async def never(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    slow = OpenAIAdapter(httpx.AsyncClient(transport=httpx.MockTransport(never)), "http://x/v1", None)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(call_with_retries(slow, REQUEST, max_attempts=5, deadline_at=time.time() + 0.5), 20)
    assert time.monotonic() - started < 15


async def test_injected_clock_decides_the_deadline() -> None:
    now = [1000.0]

    def slow_503(request: httpx.Request) -> httpx.Response:
        now[0] += 1.0  # by the fake clock, each call takes a second
        return httpx.Response(503)

    calls = OpenAIAdapter(httpx.AsyncClient(transport=httpx.MockTransport(slow_503)), "http://x/v1", None)
    with pytest.raises(DeadlineExceeded):
        await call_with_retries(calls, REQUEST, max_attempts=5, deadline_at=1000.9, clock=lambda: now[0])
    assert now[0] == 1001.0  # one call; after it the deadline had passed, so no second one


async def test_cancellation_is_not_swallowed() -> None:
    started = asyncio.Event()

    async def hang(request: httpx.Request) -> httpx.Response:
        started.set()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    slow = OpenAIAdapter(httpx.AsyncClient(transport=httpx.MockTransport(hang)), "http://x/v1", None)
    task = asyncio.create_task(call_with_retries(slow, REQUEST, max_attempts=5, deadline_at=None))
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)


async def test_one_attempt_allowed_raises_the_first_error_after_one_call() -> None:
    # The first call is made outside tenacity; with no retry left, its error is what comes out.
    script = Script(httpx.Response(503), ok())
    seen: list[float] = []
    with pytest.raises(ProviderUnavailable, match="503"):
        await call_with_retries(
            adapter(script), REQUEST, max_attempts=1, deadline_at=None, on_retry=lambda exc, wait: seen.append(wait)
        )
    assert len(script.times) == 1
    assert seen == []
