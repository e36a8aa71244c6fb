"""Which providers exist and where they live, from the environment (see CONTRACT.md)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import httpx

from farebox.providers.anthropic import AnthropicAdapter
from farebox.providers.base import ProviderAdapter
from farebox.providers.gemini import GeminiAdapter
from farebox.providers.openai import OpenAIAdapter
from farebox.settings import Settings

Kind = Literal["openai", "anthropic", "gemini", "openai_compatible"]
EXTRA_ENV = "FAREBOX_PROVIDERS_EXTRA"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    kind: Kind
    base_url: str
    api_key: str | None = field(default=None, repr=False)  # never in logs or tracebacks
    emulated: bool = False  # pointed at the local emulator because no key was set


@dataclass(frozen=True)
class _Builtin:
    name: str
    kind: Kind
    key_env: str
    url_env: str
    real_url: str
    emulator_path: str


BUILTINS = (
    _Builtin("openai", "openai", "OPENAI_API_KEY", "OPENAI_BASE_URL", "https://api.openai.com/v1", "/openai/v1"),
    _Builtin(
        "anthropic",
        "anthropic",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
        "https://api.anthropic.com/v1",
        "/anthropic/v1",
    ),
    _Builtin(
        "google",
        "gemini",
        "GEMINI_API_KEY",
        "GEMINI_BASE_URL",
        "https://generativelanguage.googleapis.com/v1beta",
        "/google/v1beta",
    ),
)


def _env(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def key_env_name(provider: str) -> str:
    """NAME_API_KEY for an extra provider: "lm-studio" reads LM_STUDIO_API_KEY."""
    return re.sub(r"[^A-Za-z0-9]", "_", provider).upper() + "_API_KEY"


def _extras(env: Mapping[str, str]) -> dict[str, ProviderConfig]:
    extras: dict[str, ProviderConfig] = {}
    for item in filter(None, (part.strip() for part in env.get(EXTRA_ENV, "").split(","))):
        name, sep, url = (s.strip() for s in item.partition("="))
        if not sep or not _NAME.match(name) or not url.startswith(("http://", "https://")):
            raise ValueError(f"{EXTRA_ENV}: expected name=http(s)://base-url, got {item!r}")
        if name in extras or any(b.name == name for b in BUILTINS):
            raise ValueError(f"{EXTRA_ENV}: provider {name!r} is defined twice")
        extras[name] = ProviderConfig(
            name=name,
            kind="openai_compatible",
            base_url=url.rstrip("/"),
            api_key=_env(env, key_env_name(name)),
        )
    return extras


def emulator_url(settings: Settings) -> str:
    """Where providers without a key are sent: FAREBOX_EMULATOR_URL, else the local emulator."""
    return settings.emulator_url or f"http://127.0.0.1:{settings.emulator_port}"


def provider_configs(env: Mapping[str, str], *, emulator_url: str | None) -> dict[str, ProviderConfig]:
    """Every provider: real endpoints where a key (or a base URL) is set, else the emulator.

    A base URL without a key counts as configured too, so a keyless local server (Ollama) set
    through OPENAI_BASE_URL is used rather than silently replaced by the emulator.
    """
    configs: dict[str, ProviderConfig] = {}
    for b in BUILTINS:
        key, url = _env(env, b.key_env), _env(env, b.url_env)
        if key is None and url is None and emulator_url is not None:
            configs[b.name] = ProviderConfig(
                b.name, b.kind, emulator_url.rstrip("/") + b.emulator_path, None, emulated=True
            )
        else:
            configs[b.name] = ProviderConfig(b.name, b.kind, (url or b.real_url).rstrip("/"), key)
    configs.update(_extras(env))
    return configs


def build_adapter(config: ProviderConfig, client: httpx.AsyncClient) -> ProviderAdapter:
    if config.kind == "openai":
        return OpenAIAdapter(client, config.base_url, config.api_key, name=config.name)
    if config.kind == "openai_compatible":
        return OpenAIAdapter(client, config.base_url, config.api_key, name=config.name, compatible=True)
    if config.kind == "anthropic":
        return AnthropicAdapter(client, config.base_url, config.api_key, name=config.name)
    return GeminiAdapter(client, config.base_url, config.api_key, name=config.name)
