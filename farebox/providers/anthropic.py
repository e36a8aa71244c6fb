"""Anthropic messages API."""

from __future__ import annotations

from typing import Any

import httpx

from farebox.providers.base import (
    JsonAdapter,
    MalformedResponse,
    ProviderReply,
    ProviderRequest,
    estimated_reply,
    field,
    system_and_turns,
    token_int,
)
from farebox.schemas import Usage

API_VERSION = "2023-06-01"
MAX_TEMPERATURE = 1.0  # Anthropic's range is 0..1 where the job schema allows 0..2


class AnthropicAdapter(JsonAdapter):
    def __init__(
        self, client: httpx.AsyncClient, base_url: str, api_key: str | None, *, name: str = "anthropic"
    ) -> None:
        self.name = name
        self._client = client
        self._url = base_url.rstrip("/") + "/messages"
        self._api_key = api_key

    def __repr__(self) -> str:
        return f"AnthropicAdapter(name={self.name!r}, url={self._url!r})"

    def body(self, request: ProviderRequest) -> dict[str, Any]:
        system, turns = system_and_turns(request, "anthropic")
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            "messages": [{"role": role, "content": "\n\n".join(contents)} for role, contents in turns],
            "temperature": min(request.temperature, MAX_TEMPERATURE),
        }
        if system:
            body["system"] = system
        return body

    def headers(self) -> dict[str, str]:
        headers = {"anthropic-version": API_VERSION}
        if self._api_key:
            headers["x-api-key"] = self._api_key
        return headers

    def endpoint(self, request: ProviderRequest) -> str:
        return self._url

    def parse(self, request: ProviderRequest, data: Any) -> ProviderReply:
        blocks = field(data, "content")
        if not isinstance(blocks, list):
            raise MalformedResponse("content is not a list")
        # Only text blocks are answer text; thinking or tool blocks are not shown to the caller.
        text = "".join(
            b["text"]
            for b in blocks
            if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        )
        model = data.get("model") if isinstance(data.get("model"), str) else request.model
        usage = data.get("usage")
        given = token_int(usage.get("input_tokens")) if isinstance(usage, dict) else None
        output = token_int(usage.get("output_tokens")) if isinstance(usage, dict) else None
        if isinstance(usage, dict) and given is not None and output is not None:
            # Anthropic's input_tokens leave out cache reads and writes; farebox's input_tokens
            # is the whole prompt, with the cache-read part also in cached_input_tokens.
            read = token_int(usage.get("cache_read_input_tokens")) or 0
            written = token_int(usage.get("cache_creation_input_tokens")) or 0
            total = given + read + written
            counted = Usage(input_tokens=total, output_tokens=output, cached_input_tokens=read)
            return ProviderReply(content=text, usage=counted, model=model, usage_reported=True)
        return estimated_reply(request, text, model)
