"""The official OpenAI and Anthropic SDKs accept the emulator's answers and errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anthropic
import openai
import pytest
import pytest_asyncio

from farebox.emulator.knobs import EmulatorKnobs
from farebox.emulator.server import running
from farebox.tokens import count_messages


@pytest_asyncio.fixture
async def emu_url() -> AsyncIterator[str]:
    async with running(EmulatorKnobs(port=0)) as url:
        yield url


async def test_openai_sdk_parses_a_completion(emu_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{emu_url}/openai/v1", api_key="x", max_retries=0)
    async with client:
        completion = await client.chat.completions.create(
            model="gpt-4o-mini",
            max_tokens=25,
            temperature=0,
            messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason in {"stop", "length"}
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == count_messages([("system", "be brief"), ("user", "hi")])
    assert 0 < completion.usage.completion_tokens <= 25
    details = completion.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens == 0


async def test_openai_sdk_sees_errors_as_errors(emu_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{emu_url}/openai/v1", api_key="x", max_retries=0)
    async with client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="gpt-4o-mini", messages=[], max_tokens=5)
    assert info.value.status_code == 400
    assert info.value.param == "messages"


async def test_anthropic_sdk_parses_a_message(emu_url: str) -> None:
    client = anthropic.AsyncAnthropic(base_url=f"{emu_url}/anthropic", api_key="x", max_retries=0)
    async with client:
        message = await client.messages.create(
            model="claude-3-5-haiku-latest",
            max_tokens=25,
            system="be brief",
            messages=[{"role": "user", "content": "hi"}],
        )
    assert message.type == "message" and message.role == "assistant"
    block = message.content[0]
    assert block.type == "text" and block.text
    assert message.stop_reason in {"end_turn", "max_tokens"}
    assert message.usage.input_tokens == count_messages([("system", "be brief"), ("user", "hi")])
    assert 0 < message.usage.output_tokens <= 25
    assert message.usage.cache_read_input_tokens == 0


async def test_anthropic_sdk_sees_rate_limits() -> None:
    async with running(EmulatorKnobs(port=0, rate_limit_rate=1.0, faulty="anthropic")) as url:
        client = anthropic.AsyncAnthropic(base_url=f"{url}/anthropic", api_key="x", max_retries=0)
        async with client:
            with pytest.raises(anthropic.RateLimitError) as info:
                await client.messages.create(
                    model="claude-3-5-haiku-latest", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
                )
    assert info.value.status_code == 429
    assert info.value.response.headers.get("retry-after") == "1"
