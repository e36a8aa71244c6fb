"""The batch adapter for a configured provider, beside registry.py's sync one."""

from __future__ import annotations

import httpx

from farebox.providers.batch_anthropic import AnthropicBatchAdapter
from farebox.providers.batch_gemini import GeminiBatchAdapter
from farebox.providers.batch_openai import OpenAIBatchAdapter
from farebox.providers.batch_types import BatchAdapter
from farebox.providers.registry import ProviderConfig


def build_batch_adapter(config: ProviderConfig, client: httpx.AsyncClient) -> BatchAdapter | None:
    """None for an OpenAI-compatible server: vLLM, Ollama and friends serve no Batch API, and their
    jobs stay on the synchronous lane."""
    if config.kind == "openai":
        return OpenAIBatchAdapter(client, config.base_url, config.api_key, name=config.name)
    if config.kind == "anthropic":
        return AnthropicBatchAdapter(client, config.base_url, config.api_key, name=config.name)
    if config.kind == "gemini":
        return GeminiBatchAdapter(client, config.base_url, config.api_key, name=config.name)
    return None
