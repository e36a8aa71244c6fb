"""Google Gemini generateContent (Generative Language API)."""

from __future__ import annotations

from typing import Any

import httpx

from farebox.errors import ProviderRejected
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

_ROLES = {"user": "user", "assistant": "model"}


class GeminiAdapter(JsonAdapter):
    def __init__(self, client: httpx.AsyncClient, base_url: str, api_key: str | None, *, name: str = "google") -> None:
        self.name = name
        self._client = client
        self._base = base_url.rstrip("/")
        self._api_key = api_key

    def __repr__(self) -> str:
        return f"GeminiAdapter(name={self.name!r}, url={self._base!r})"

    def url(self, model: str) -> str:
        # Catalog names may carry the API's "models/" prefix; the path adds it once.
        return f"{self._base}/models/{model.removeprefix('models/')}:generateContent"

    def body(self, request: ProviderRequest) -> dict[str, Any]:
        system, turns = system_and_turns(request, "gemini")
        body: dict[str, Any] = {
            "contents": [{"role": _ROLES[role], "parts": [{"text": c} for c in contents]} for role, contents in turns],
            "generationConfig": {"maxOutputTokens": request.max_tokens, "temperature": request.temperature},
        }
        if system:
            body["systemInstruction"] = {"parts": [{"text": system}]}
        return body

    def headers(self) -> dict[str, str]:
        # The key goes in a header, never in ?key=, so it cannot leak through a logged URL.
        return {"x-goog-api-key": self._api_key} if self._api_key else {}

    def endpoint(self, request: ProviderRequest) -> str:
        return self.url(request.model)

    def parse(self, request: ProviderRequest, data: Any) -> ProviderReply:
        if not isinstance(data, dict):
            raise MalformedResponse("body is not an object")
        candidates = data.get("candidates")
        if not candidates:
            feedback = data.get("promptFeedback")
            reason = feedback.get("blockReason") if isinstance(feedback, dict) else None
            if reason:
                # A blocked prompt is blocked again on retry.
                raise ProviderRejected(f"{self.name} refused the prompt (blockReason {reason})")
            raise MalformedResponse("missing candidates")
        candidate = field(candidates, 0)
        if not isinstance(candidate, dict):
            raise MalformedResponse("candidates.0 is not an object")
        # A candidate stopped by a safety filter may carry no content at all: an empty answer.
        content = candidate.get("content") or {}
        parts = content.get("parts", []) if isinstance(content, dict) else None
        if not isinstance(parts, list):
            raise MalformedResponse("candidates.0.content.parts is not a list")
        # Thought summaries are parts too (thought: true); they are not the answer.
        text = "".join(
            p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str) and not p.get("thought")
        )
        version = data.get("modelVersion")
        model = version if isinstance(version, str) and version else request.model
        usage = data.get("usageMetadata")
        prompt = token_int(usage.get("promptTokenCount")) if isinstance(usage, dict) else None
        if isinstance(usage, dict) and prompt is not None:
            # candidatesTokenCount is left out when the answer is empty; thinking is billed as output.
            output = (token_int(usage.get("candidatesTokenCount")) or 0) + (
                token_int(usage.get("thoughtsTokenCount")) or 0
            )
            cached = token_int(usage.get("cachedContentTokenCount")) or 0
            counted = Usage(input_tokens=prompt, output_tokens=output, cached_input_tokens=cached)
            return ProviderReply(content=text, usage=counted, model=model, usage_reported=True)
        return estimated_reply(request, text, model)
