"""What every provider adapter shares: the request/reply types and the HTTP-error mapping.

The mapping is the one place that decides what an HTTP outcome means for a job: a 429 or 5xx
is worth retrying, any other 4xx never is, and a 200 we cannot read is treated like a 5xx
(a proxy hiccup rarely repeats). Messages name the status and the provider's own error type
but never carry the API key or the prompt.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from farebox.errors import InvalidRequest, ProviderRejected, ProviderUnavailable, RateLimited
from farebox.schemas import ChatMessage, Usage
from farebox.tokens import count_messages, count_text

DETAIL_CHARS = 200
# Belt and braces: even a provider that echoes a key back (OpenAI's 401 does, masked) must not
# get one into our logs or results.
_KEY_LIKE = re.compile(r"(sk-[A-Za-z0-9_*-]{6,}|sk-ant-[A-Za-z0-9_*-]{6,}|AIza[0-9A-Za-z_-]{20,})")


@dataclass(frozen=True)
class ProviderRequest:
    model: str
    messages: tuple[ChatMessage, ...]
    max_tokens: int
    temperature: float
    timeout_s: float


@dataclass(frozen=True)
class ProviderReply:
    content: str
    usage: Usage
    model: str
    usage_reported: bool  # False when the provider sent no usage and tiktoken counted it


class ProviderAdapter(Protocol):
    name: str

    async def complete(self, request: ProviderRequest) -> ProviderReply: ...


class MalformedResponse(ValueError):
    """A 2xx body without the fields the adapter needs; ``str`` names the field, not its value."""


def scrub(text: str, secrets: Iterable[str | None] = ()) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _KEY_LIKE.sub("***", text)


def _short(text: str, secrets: Iterable[str | None]) -> str:
    text = " ".join(scrub(text, secrets).split())
    return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 3] + "..."


@contextmanager
def map_http_errors(provider: str, *, timeout_s: float, secrets: Iterable[str | None] = ()) -> Iterator[None]:
    """Turn transport failures inside the block into farebox errors."""
    try:
        yield
    except (httpx.TimeoutException, TimeoutError) as exc:
        raise ProviderUnavailable(f"{provider}: no answer within {timeout_s:g} s") from exc
    except httpx.UnsupportedProtocol as exc:
        # A base URL without http(s):// is a configuration mistake; retrying cannot fix it.
        raise ProviderRejected(f"{provider}: bad endpoint URL ({_short(str(exc), secrets)})") from exc
    except httpx.LocalProtocolError as exc:
        # A request that cannot be sent (a control character in a header: a key with its "\r").
        raise ProviderRejected(f"{provider}: request could not be sent ({_short(str(exc), secrets)})") from exc
    except httpx.TransportError as exc:
        detail = _short(str(exc), secrets) or type(exc).__name__
        raise ProviderUnavailable(f"{provider}: connection failed ({detail})") from exc
    except httpx.DecodingError as exc:  # a body its content-encoding cannot decode (bad gzip)
        raise ProviderUnavailable(f"{provider}: malformed response ({_short(str(exc), secrets)})") from exc


def retry_after_s(headers: httpx.Headers, *, now: float | None = None) -> float | None:
    """Seconds the provider asks us to wait: retry-after-ms, Retry-After seconds or HTTP-date."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _error_detail(response: httpx.Response, secrets: Iterable[str | None]) -> str:
    """The provider's error type and message from the usual JSON shapes, else the raw text."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _short(response.text, secrets)
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        # OpenAI: type/code; Anthropic: type; Gemini: status.
        kind = error.get("type") or error.get("status") or error.get("code")
        message = error.get("message")
        text = f"{kind}: {message}" if kind and message else str(message or kind or "")
        return _short(text, secrets)
    if isinstance(error, str):  # vLLM, Ollama and friends
        return _short(error, secrets)
    return _short(response.text, secrets)


def check_response(provider: str, response: httpx.Response, *, secrets: Iterable[str | None] = ()) -> Any:
    """Raise the farebox error a non-2xx status means; otherwise return the parsed JSON body."""
    status = response.status_code
    if not 200 <= status < 300:
        detail = _error_detail(response, secrets)
        message = f"{provider} answered HTTP {status}" + (f" ({detail})" if detail else "")
        if status == 429:
            raise RateLimited(message, retry_after_s=retry_after_s(response.headers))
        # 408 (request timeout) and 409 (lock/conflict, as Anthropic documents it) are transient.
        if status >= 500 or status in (408, 409):
            raise ProviderUnavailable(message)
        raise ProviderRejected(message)
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProviderUnavailable(
            f"{provider}: malformed response (HTTP {status} body is not JSON, {len(response.content)} bytes)"
        ) from exc


def malformed(provider: str, exc: MalformedResponse) -> ProviderUnavailable:
    return ProviderUnavailable(f"{provider}: malformed response ({exc})")


@functools.lru_cache(maxsize=1024)
def parsed_url(url: str) -> httpx.URL:
    # An adapter posts to a handful of URLs over and over; httpx would parse each one per call
    # (13 us of 31 us per request built, measured).
    return httpx.URL(url)


@functools.lru_cache(maxsize=256)
def _json_headers(
    client_headers: tuple[tuple[bytes, bytes], ...], headers: tuple[tuple[str, str], ...]
) -> httpx.Headers:
    merged = httpx.Headers(list(client_headers))
    merged.update(dict(headers))
    merged["Content-Type"] = "application/json"
    return merged


def json_request(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict[str, Any], timeout_s: float
) -> httpx.Request:
    """The request ``client.post(url, headers=headers, json=body, timeout=timeout_s)`` would send
    (same headers, same JSON bytes), built without merging the client's defaults per call:
    ``build_request`` was a fifth of httpx's CPU per provider call (bench/http_client.py)."""
    return httpx.Request(
        "POST",
        parsed_url(url),
        headers=_json_headers(tuple(client.headers.raw), tuple(headers.items())),
        content=json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(),
        extensions={"timeout": httpx.Timeout(timeout_s).as_dict()},
    )


async def post_json(
    client: httpx.AsyncClient,
    provider: str,
    url: str,
    *,
    headers: dict[str, str],
    body: dict[str, Any],
    timeout_s: float,
    secret: str | None,
) -> Any:
    """POST a JSON body and return the parsed 2xx body, mapping every failure to farebox errors."""
    with map_http_errors(provider, timeout_s=timeout_s, secrets=(secret,)):
        # httpx's timeout is per phase (connect, read, ...); the outer one bounds the whole call,
        # so a server that trickles bytes cannot hold the job past its budget.
        async with asyncio.timeout(timeout_s):
            response = await client.send(json_request(client, url, headers, body, timeout_s))
    return check_response(provider, response, secrets=(secret,))


class JsonAdapter:
    """The one request/reply loop every HTTP+JSON adapter shares: a subclass says where to POST,
    what to send and how to read the answer; sending, error mapping and malformed-reply handling
    live here once."""

    name: str
    _client: httpx.AsyncClient
    _api_key: str | None

    def endpoint(self, request: ProviderRequest) -> str:
        raise NotImplementedError

    def headers(self) -> dict[str, str]:
        raise NotImplementedError

    def body(self, request: ProviderRequest) -> dict[str, Any]:
        raise NotImplementedError

    def parse(self, request: ProviderRequest, data: Any) -> ProviderReply:
        raise NotImplementedError

    async def complete(self, request: ProviderRequest) -> ProviderReply:
        data = await post_json(
            self._client,
            self.name,
            self.endpoint(request),
            headers=self.headers(),
            body=self.body(request),
            timeout_s=request.timeout_s,
            secret=self._api_key,
        )
        try:
            return self.parse(request, data)
        except MalformedResponse as exc:
            raise malformed(self.name, exc) from None


# --- helpers for reading replies -------------------------------------------------------------
def field(obj: Any, *path: str | int) -> Any:
    """``obj[path0][path1]...``; raises MalformedResponse naming the missing path."""
    current = obj
    for i, key in enumerate(path):
        try:
            current = current[key]
        except (KeyError, IndexError, TypeError):
            where = ".".join(str(p) for p in path[: i + 1])
            raise MalformedResponse(f"missing {where}") from None
    return current


def estimated_reply(request: ProviderRequest, content: str, model: str) -> ProviderReply:
    """The reply with our own tiktoken estimate, for providers that send no usage."""
    usage = Usage(
        input_tokens=count_messages((m.role, m.content) for m in request.messages),
        output_tokens=count_text(content),
    )
    return ProviderReply(content=content, usage=usage, model=model, usage_reported=False)


def token_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def system_and_turns(request: ProviderRequest, provider: str) -> tuple[str | None, list[tuple[str, list[str]]]]:
    """The system messages joined, and the rest as (role, contents) turns where consecutive messages
    of one role are merged: the Anthropic and Gemini APIs want user and assistant to alternate and
    take the system prompt apart from the turns."""
    system = [m.content for m in request.messages if m.role == "system"]
    turns: list[tuple[str, list[str]]] = []
    for m in request.messages:
        if m.role == "system":
            continue
        if turns and turns[-1][0] == m.role:
            turns[-1][1].append(m.content)
        else:
            turns.append((m.role, [m.content]))
    if not turns:
        raise InvalidRequest(f"{provider} needs at least one user or assistant message, not only system")
    return ("\n\n".join(system) if system else None), turns
