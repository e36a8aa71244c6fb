"""The three wire formats the emulator speaks: request checks, replies and error bodies.

Each format is checked about as strictly as the real API (a missing ``max_tokens`` is a 400 for
Anthropic, not for OpenAI) so adapter bugs show up against the emulator, not only in production.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from farebox.emulator.text import Answer

ErrorKind = Literal["invalid", "not_found", "rate_limit", "server", "unavailable"]
STATUS: dict[ErrorKind, int] = {
    "invalid": 400,
    "not_found": 404,
    "rate_limit": 429,
    "server": 500,
    "unavailable": 503,
}
DEFAULT_MAX_TOKENS = 4096  # OpenAI and Gemini let callers omit the limit


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class Prompt:
    model: str
    pairs: tuple[tuple[str, str], ...]  # (role, text), system first, as farebox.tokens counts them
    max_tokens: int


class Wire(Protocol):
    def parse(self, body: Any, path_model: str | None) -> Prompt: ...
    def render(self, prompt: Prompt, answer: Answer, input_tokens: int) -> dict[str, Any]: ...
    def error(self, kind: ErrorKind, message: str, param: str | None = None) -> dict[str, Any]: ...


# --- shared checks ---------------------------------------------------------------------------
def _obj(body: Any, what: str = "request body") -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a non-empty string", "model")
    try:
        model.encode()  # a lone surrogate (a "\\ud800" escape in the JSON) would break every reply naming it
    except UnicodeEncodeError:
        raise BadRequest("'model' must be valid Unicode text", "model") from None
    return model


def _positive_int(value: Any, param: str, *, required: bool, default: int = DEFAULT_MAX_TOKENS) -> int:
    if value is None:
        if required:
            raise BadRequest(f"'{param}' is required", param)
        return default
    # bool is an int in Python but not in JSON Schema.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"'{param}' must be an integer >= 1", param)
    return value


def _temperature(value: Any, param: str, high: float) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= high:
        raise BadRequest(f"'{param}' must be a number between 0 and {high:g}", param)


def _no_stream(body: dict[str, Any]) -> None:
    if body.get("stream"):
        raise BadRequest("stream=true is not supported by the farebox emulator", "stream")


def _text_blocks(content: Any, param: str, *, part_key: str = "type") -> str:
    """A string, or a list of text blocks ({"type": "text", "text": ...} / {"text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, block in enumerate(content):
            if not isinstance(block, dict) or not isinstance(block.get("text"), str):
                raise BadRequest(f"{param}[{i}] must be a text block", f"{param}[{i}]")
            if part_key == "type" and block.get("type") != "text":
                raise BadRequest(f"{param}[{i}]: only text blocks are emulated", f"{param}[{i}]")
            texts.append(block["text"])
        return "".join(texts)
    raise BadRequest(f"{param} must be a string or a list of text blocks", param)


def _messages(body: dict[str, Any], roles: frozenset[str]) -> list[tuple[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' is required and must be a non-empty array", "messages")
    pairs = []
    for i, raw in enumerate(messages):
        msg = _obj(raw, f"messages[{i}]")
        role = msg.get("role")
        if role not in roles:
            raise BadRequest(f"messages[{i}].role must be one of {sorted(roles)}", f"messages[{i}].role")
        content = msg.get("content")
        if content is None and role == "assistant":
            text = ""  # an assistant turn that only called tools has no text
        else:
            text = _text_blocks(content, f"messages[{i}].content")
        pairs.append((str(role), text))
    return pairs


# Seeded from the OS once (ids need only be unique; uuid4 read urandom per reply). Every emulator
# is a process of its own, never forked, so no two share this generator's state.
_ids = random.Random()


def _hex(chars: int) -> str:
    return f"{_ids.getrandbits(chars * 4):0{chars}x}"


def _new_id(prefix: str) -> str:
    return prefix + _hex(24)


# --- OpenAI chat completions -----------------------------------------------------------------
class OpenAIWire:
    ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
    TYPES: dict[ErrorKind, tuple[str, str | None]] = {
        "invalid": ("invalid_request_error", None),
        "not_found": ("invalid_request_error", "not_found"),
        "rate_limit": ("requests", "rate_limit_exceeded"),
        "server": ("server_error", None),
        "unavailable": ("server_error", "unavailable"),
    }

    def parse(self, body: Any, path_model: str | None) -> Prompt:
        body = _obj(body)
        model = _model(body)
        pairs = _messages(body, self.ROLES)
        _no_stream(body)
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = _positive_int(limit, param, required=False)
        _temperature(body.get("temperature"), "temperature", 2.0)
        return Prompt(model, tuple(pairs), max_tokens)

    def render(self, prompt: Prompt, answer: Answer, input_tokens: int) -> dict[str, Any]:
        return {
            "id": _new_id("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": prompt.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer.text, "refusal": None, "annotations": []},
                    "logprobs": None,
                    "finish_reason": "length" if answer.hit_limit else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": input_tokens,
                "completion_tokens": answer.tokens,
                "total_tokens": input_tokens + answer.tokens,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
            },
            "service_tier": "default",
            "system_fingerprint": "fp_farebox_emulator",
        }

    def error(self, kind: ErrorKind, message: str, param: str | None = None) -> dict[str, Any]:
        etype, code = self.TYPES[kind]
        return {"error": {"message": message, "type": etype, "param": param, "code": code}}


# --- Anthropic messages ----------------------------------------------------------------------
class AnthropicWire:
    ROLES = frozenset({"user", "assistant"})
    TYPES: dict[ErrorKind, str] = {
        "invalid": "invalid_request_error",
        "not_found": "not_found_error",
        "rate_limit": "rate_limit_error",
        "server": "api_error",
        "unavailable": "overloaded_error",
    }

    def parse(self, body: Any, path_model: str | None) -> Prompt:
        body = _obj(body)
        model = _model(body)
        max_tokens = _positive_int(body.get("max_tokens"), "max_tokens", required=True)
        pairs = _messages(body, self.ROLES)
        _no_stream(body)
        _temperature(body.get("temperature"), "temperature", 1.0)
        system = body.get("system")
        if system is not None:
            pairs.insert(0, ("system", _text_blocks(system, "system")))
        return Prompt(model, tuple(pairs), max_tokens)

    def render(self, prompt: Prompt, answer: Answer, input_tokens: int) -> dict[str, Any]:
        return {
            "id": _new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": prompt.model,
            "content": [{"type": "text", "text": answer.text}],
            "stop_reason": "max_tokens" if answer.hit_limit else "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": answer.tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }

    def error(self, kind: ErrorKind, message: str, param: str | None = None) -> dict[str, Any]:
        # Anthropic and Gemini have no "param" field; every message already names the field.
        return {"type": "error", "error": {"type": self.TYPES[kind], "message": message}}


# --- Gemini generateContent ------------------------------------------------------------------
class GeminiWire:
    ROLES = {"user": "user", "model": "assistant"}
    STATUSES: dict[ErrorKind, str] = {
        "invalid": "INVALID_ARGUMENT",
        "not_found": "NOT_FOUND",
        "rate_limit": "RESOURCE_EXHAUSTED",
        "server": "INTERNAL",
        "unavailable": "UNAVAILABLE",
    }

    def parse(self, body: Any, path_model: str | None) -> Prompt:
        body = _obj(body)
        if not path_model:
            raise BadRequest("the model is missing from the path", "model")
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            raise BadRequest("'contents' is required and must be a non-empty array", "contents")
        pairs: list[tuple[str, str]] = []
        system = body.get("systemInstruction", body.get("system_instruction"))
        if system is not None:
            parts = _obj(system, "systemInstruction").get("parts")
            pairs.append(("system", _text_blocks(parts, "systemInstruction.parts", part_key="text")))
        for i, raw in enumerate(contents):
            content = _obj(raw, f"contents[{i}]")
            role = content.get("role", "user")
            if role not in self.ROLES:
                raise BadRequest(f"contents[{i}].role must be 'user' or 'model'", f"contents[{i}].role")
            text = _text_blocks(content.get("parts"), f"contents[{i}].parts", part_key="text")
            pairs.append((self.ROLES[role], text))
        config = _obj(body.get("generationConfig") or {}, "generationConfig")
        max_tokens = _positive_int(config.get("maxOutputTokens"), "generationConfig.maxOutputTokens", required=False)
        _temperature(config.get("temperature"), "generationConfig.temperature", 2.0)
        return Prompt(path_model, tuple(pairs), max_tokens)

    def render(self, prompt: Prompt, answer: Answer, input_tokens: int) -> dict[str, Any]:
        return {
            "candidates": [
                {
                    "content": {"role": "model", "parts": [{"text": answer.text}]},
                    "finishReason": "MAX_TOKENS" if answer.hit_limit else "STOP",
                    "index": 0,
                }
            ],
            "usageMetadata": {
                "promptTokenCount": input_tokens,
                "candidatesTokenCount": answer.tokens,
                "totalTokenCount": input_tokens + answer.tokens,
            },
            "modelVersion": prompt.model,
            "responseId": _hex(22),
        }

    def error(self, kind: ErrorKind, message: str, param: str | None = None) -> dict[str, Any]:
        return {"error": {"code": STATUS[kind], "message": message, "status": self.STATUSES[kind]}}
