"""Fault knobs, seen through the real adapters: each fault maps to the error the pipeline expects."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from farebox.emulator.knobs import EmulatorKnobs
from farebox.emulator.server import running
from farebox.errors import ProviderUnavailable, RateLimited
from farebox.providers.base import ProviderAdapter, ProviderRequest
from farebox.providers.registry import build_adapter, provider_configs
from farebox.schemas import ChatMessage

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-3-5-haiku-latest", "google": "gemini-2.0-flash"}


def request(provider: str, timeout_s: float = 10.0) -> ProviderRequest:
    return ProviderRequest(
        model=MODELS[provider],
        messages=(ChatMessage(role="user", content="hello"),),
        max_tokens=30,
        temperature=0.0,
        timeout_s=timeout_s,
    )


@contextlib.asynccontextmanager
async def adapters(**knobs: Any) -> AsyncIterator[tuple[dict[str, ProviderAdapter], httpx.AsyncClient]]:
    async with running(EmulatorKnobs(port=0, **knobs)) as url, httpx.AsyncClient() as http:
        configs = provider_configs({}, emulator_url=url)
        built = {name: build_adapter(config, http) for name, config in configs.items()}
        async with httpx.AsyncClient(base_url=url) as control:
            yield built, control


@pytest.mark.parametrize("provider", ["openai", "anthropic", "google"])
async def test_adapter_against_emulator(provider: str) -> None:
    async with adapters() as (built, control):
        reply = await built[provider].complete(request(provider))
        again = await built[provider].complete(request(provider))
        stats = (await control.get("/_emulator/stats")).json()
    assert reply.content and reply.content == again.content
    assert reply.usage_reported and 0 < reply.usage.output_tokens <= 30 and reply.usage.input_tokens > 0
    assert stats["requests"] == {f"{provider}/{MODELS[provider]}": 2}


@pytest.mark.parametrize(
    ("knob", "error", "text", "fault"),
    [
        ("fail_rate", ProviderUnavailable, "HTTP 500", "fail"),
        ("rate_limit_rate", RateLimited, "HTTP 429", "rate_limit"),
        ("malformed_rate", ProviderUnavailable, "malformed", "malformed"),
        ("truncated_rate", ProviderUnavailable, "malformed", "truncated"),
    ],
)
@pytest.mark.parametrize("provider", ["openai", "anthropic", "google"])
async def test_each_fault_at_full_rate(provider: str, knob: str, error: type[Exception], text: str, fault: str) -> None:
    async with adapters(**{knob: 1.0, "retry_after_s": 0.05}) as (built, control):
        with pytest.raises(error, match=text) as info:
            await built[provider].complete(request(provider))
        stats = (await control.get("/_emulator/stats")).json()
    assert stats["faults"] == {fault: 1}
    assert stats["requests"] == {f"{provider}/{MODELS[provider]}": 1}
    if isinstance(info.value, RateLimited):
        assert info.value.retry_after_s == pytest.approx(0.05)


async def test_timeout_fault_never_answers() -> None:
    async with adapters(timeout_rate=1.0) as (built, control):
        started = time.monotonic()
        with pytest.raises(ProviderUnavailable, match="no answer"):
            await asyncio.wait_for(built["openai"].complete(request("openai", timeout_s=0.3)), 20)
        assert time.monotonic() - started < 15  # the client's timeout fired; nothing hung
        assert (await control.get("/_emulator/stats")).json()["faults"] == {"timeout": 1}


async def test_faulty_list_limits_faults_to_named_providers() -> None:
    async with adapters(fail_rate=1.0, faulty="anthropic") as (built, control):
        ok_openai = await built["openai"].complete(request("openai"))
        ok_google = await built["google"].complete(request("google"))
        with pytest.raises(ProviderUnavailable):
            await built["anthropic"].complete(request("anthropic"))
        stats = (await control.get("/_emulator/stats")).json()
    assert ok_openai.content and ok_google.content
    assert stats["faults"] == {"fail": 1}
    assert sum(stats["requests"].values()) == 3


async def outcomes(seed: int, n: int) -> list[int]:
    async with (
        running(EmulatorKnobs(port=0, fail_rate=0.3, rate_limit_rate=0.2, seed=seed)) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        return [(await client.post("/openai/v1/chat/completions", json=body)).status_code for _ in range(n)]


async def test_seeded_faults_repeat() -> None:
    first, second = await outcomes(42, 40), await outcomes(42, 40)
    assert first == second
    assert set(first) == {200, 429, 500}  # with 40 draws at these rates all three show up


async def test_partial_rates_mix_faults_and_answers() -> None:
    statuses = await outcomes(7, 200)
    share_ok = statuses.count(200) / len(statuses)
    assert 0.3 < share_ok < 0.7  # expected 0.5; loose enough for any seed
