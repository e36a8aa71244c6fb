"""OpenAI chat completions, and any server that speaks the same wire format (vLLM, Ollama, ...)."""

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
    token_int,
)
from farebox.schemas import Usage

# Reasoning models refuse any temperature but the default and want max_completion_tokens.
_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")


class OpenAIAdapter(JsonAdapter):
    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        api_key: str | None,
        *,
        name: str = "openai",
        compatible: bool = False,
    ) -> None:
        self.name = name
        self._client = client
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        # OpenAI itself deprecated max_tokens; many compatible servers only know max_tokens.
        self._compatible = compatible

    def __repr__(self) -> str:
        return f"OpenAIAdapter(name={self.name!r}, url={self._url!r})"

    def body(self, request: ProviderRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        }
        reasoning = not self._compatible and request.model.startswith(_REASONING_PREFIXES)
        body["max_tokens" if self._compatible else "max_completion_tokens"] = request.max_tokens
        if not reasoning:
            body["temperature"] = request.temperature
        return body

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def endpoint(self, request: ProviderRequest) -> str:
        return self._url

    def parse(self, request: ProviderRequest, data: Any) -> ProviderReply:
        message = field(data, "choices", 0, "message")
        content = field(message, "content")
        if content is None:
            # A refusal comes back as message.refusal with null content; it is still the answer.
            content = message.get("refusal")
        if content is not None and not isinstance(content, str):
            raise MalformedResponse("choices.0.message.content is not a string")
        text = content or ""
        model = data.get("model") if isinstance(data.get("model"), str) else request.model
        usage = data.get("usage")
        prompt = token_int(usage.get("prompt_tokens")) if isinstance(usage, dict) else None
        completion = token_int(usage.get("completion_tokens")) if isinstance(usage, dict) else None
        if isinstance(usage, dict) and prompt is not None and completion is not None:
            details = usage.get("prompt_tokens_details")
            cached = token_int(details.get("cached_tokens")) if isinstance(details, dict) else None
            counted = Usage(input_tokens=prompt, output_tokens=completion, cached_input_tokens=cached or 0)
            return ProviderReply(content=text, usage=counted, model=model, usage_reported=True)
        return estimated_reply(request, text, model)
