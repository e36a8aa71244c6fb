"""Provider configuration from the environment."""

from __future__ import annotations

import httpx
import pytest

from farebox.providers.anthropic import AnthropicAdapter
from farebox.providers.gemini import GeminiAdapter
from farebox.providers.openai import OpenAIAdapter
from farebox.providers.registry import ProviderConfig, build_adapter, provider_configs

EMU = "http://127.0.0.1:8099"


def test_no_keys_point_everything_at_the_emulator() -> None:
    configs = provider_configs({}, emulator_url=EMU + "/")
    assert set(configs) == {"openai", "anthropic", "google"}
    assert configs["openai"].base_url == f"{EMU}/openai/v1"
    assert configs["anthropic"].base_url == f"{EMU}/anthropic/v1"
    assert configs["google"].base_url == f"{EMU}/google/v1beta"
    assert all(c.emulated and c.api_key is None for c in configs.values())
    assert configs["google"].kind == "gemini"


def test_keys_use_the_real_endpoints() -> None:
    env = {"OPENAI_API_KEY": "sk-one", "ANTHROPIC_API_KEY": "sk-ant-two", "GEMINI_API_KEY": "AIza-three"}
    configs = provider_configs(env, emulator_url=EMU)
    assert configs["openai"] == ProviderConfig("openai", "openai", "https://api.openai.com/v1", "sk-one")
    assert configs["anthropic"].base_url == "https://api.anthropic.com/v1"
    assert configs["google"].base_url == "https://generativelanguage.googleapis.com/v1beta"
    assert configs["google"].api_key == "AIza-three"
    assert not any(c.emulated for c in configs.values())


def test_mixed_keys_and_base_url_override() -> None:
    env = {
        "OPENAI_API_KEY": "sk-one",
        "OPENAI_BASE_URL": "https://proxy.example/v1/",
        "GEMINI_BASE_URL": "http://localhost:9000/v1beta",
    }
    configs = provider_configs(env, emulator_url=EMU)
    assert configs["openai"].base_url == "https://proxy.example/v1"
    # A base URL alone (a keyless local server) is a real endpoint, not the emulator.
    assert configs["google"].base_url == "http://localhost:9000/v1beta"
    assert configs["google"].api_key is None and not configs["google"].emulated
    assert configs["anthropic"].emulated


def test_without_emulator_the_real_endpoints_stay() -> None:
    configs = provider_configs({}, emulator_url=None)
    assert configs["openai"].base_url == "https://api.openai.com/v1"
    assert not configs["openai"].emulated


def test_repr_hides_the_key() -> None:
    configs = provider_configs({"OPENAI_API_KEY": "sk-very-secret"}, emulator_url=None)
    assert "sk-very-secret" not in repr(configs)
    assert "sk-very-secret" not in str(configs["openai"])


def test_extra_openai_compatible_providers() -> None:
    env = {
        "FAREBOX_PROVIDERS_EXTRA": "ollama=http://localhost:11434/v1, lm-studio=http://127.0.0.1:1234/v1",
        "LM_STUDIO_API_KEY": "lm-key",
    }
    configs = provider_configs(env, emulator_url=EMU)
    assert configs["ollama"] == ProviderConfig("ollama", "openai_compatible", "http://localhost:11434/v1", None)
    assert configs["lm-studio"].api_key == "lm-key"
    assert set(configs) == {"openai", "anthropic", "google", "ollama", "lm-studio"}


@pytest.mark.parametrize(
    "extra", ["noequals", "x=ftp://a", "Bad Name=http://a", "openai=http://a", "a=http://x,a=http://y"]
)
def test_bad_extra_providers_are_refused(extra: str) -> None:
    with pytest.raises(ValueError, match="FAREBOX_PROVIDERS_EXTRA"):
        provider_configs({"FAREBOX_PROVIDERS_EXTRA": extra}, emulator_url=None)


async def test_build_adapter_picks_the_wire_format() -> None:
    env = {"FAREBOX_PROVIDERS_EXTRA": "vllm=http://localhost:8000/v1"}
    configs = provider_configs(env, emulator_url=EMU)
    async with httpx.AsyncClient() as client:
        adapters = {name: build_adapter(c, client) for name, c in configs.items()}
    assert isinstance(adapters["openai"], OpenAIAdapter)
    assert isinstance(adapters["vllm"], OpenAIAdapter)
    assert isinstance(adapters["anthropic"], AnthropicAdapter)
    assert isinstance(adapters["google"], GeminiAdapter)
    assert {name: a.name for name, a in adapters.items()} == {n: n for n in adapters}
