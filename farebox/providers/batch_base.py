"""What every provider batch adapter shares: the batch types, the ``BatchAdapter`` Protocol, and the
HTTP and per-line error mapping on top of base.py's.

A batch is many sync calls answered later and cheaper. Each request is built by the sync adapter's own
``body`` and each answer read by its own ``parse``, so a batch line and a sync call of one prompt give
the same ``ProviderReply``. A line that failed is typed as a sync call's failure would be (the same
status table, ``check_response``), and a line that never ran (its batch expired, was cancelled or
failed) comes back marked so: the caller sends those to the synchronous lane.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Protocol

import httpx
from pydantic import BaseModel, ConfigDict, Field

from farebox.errors import FareboxError, InvalidRequest, ProviderUnavailable, RetryableError
from farebox.providers.base import (
    DETAIL_CHARS,
    MalformedResponse,
    ProviderReply,
    ProviderRequest,
    check_response,
    malformed,
    map_http_errors,
    scrub,
)
from farebox.schemas import ChatMessage

# Anthropic's rule for custom_id, the strictest of the three, for every provider: a caller's ids then
# fit any of them. The idempotency key follows it too (OpenAI metadata, Gemini displayName).
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_ID = re.compile(ID_PATTERN)
TIMEOUT_S = 60.0  # per HTTP call; a results file of thousands of lines takes a while to download

BatchState = Literal["in_progress", "ended", "failed", "expired", "cancelled"]
# A request that never ran: its batch expired, was cancelled or failed as a whole.
NotRun = Literal["expired", "cancelled", "failed"]
LineState = Literal["succeeded", "errored", "expired", "cancelled", "failed"]
NOT_RUN: dict[BatchState, NotRun] = {"expired": "expired", "cancelled": "cancelled", "failed": "failed"}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BatchRequest(_Frozen):
    """One request of a batch: what a ``ProviderRequest`` holds, less the model (one per batch)."""

    custom_id: str = Field(pattern=ID_PATTERN)
    messages: tuple[ChatMessage, ...] = Field(min_length=1)
    max_tokens: int = Field(gt=0)
    temperature: float = Field(0.0, ge=0.0, le=2.0)

    def provider_request(self, model: str, timeout_s: float) -> ProviderRequest:
        return ProviderRequest(model, self.messages, self.max_tokens, self.temperature, timeout_s)


class BatchHandle(_Frozen):
    """What names a batch: small and JSON-able, for the caller to persist right after ``submit``."""

    provider: str
    batch_id: str
    model: str
    idempotency_key: str
    # In submitted order. Names the lines a batch that ended without results never ran; () when
    # ``find`` cannot learn them (Gemini: see batch_gemini.py).
    custom_ids: tuple[str, ...] = ()


class BatchCounts(_Frozen):
    total: int = Field(0, ge=0)
    succeeded: int = Field(0, ge=0)
    failed: int = Field(0, ge=0)  # errored or not run

    @property
    def pending(self) -> int:
        return max(0, self.total - self.succeeded - self.failed)


class BatchError(_Frozen):
    """A farebox error as data: ``code`` is the result's ``error.code``, ``retryable`` its family."""

    code: str
    message: str
    retryable: bool

    @classmethod
    def of(cls, exc: FareboxError) -> BatchError:
        return cls(code=exc.code, message=str(exc), retryable=isinstance(exc, RetryableError))


class BatchStatus(_Frozen):
    state: BatchState
    counts: BatchCounts
    provider_status: str  # the provider's own word ("finalizing", "canceling", "BATCH_STATE_RUNNING"), for logs
    error: BatchError | None = None  # why a failed batch failed

    @property
    def ended(self) -> bool:
        return self.state != "in_progress"


class BatchLine(_Frozen):
    custom_id: str
    state: LineState
    reply: ProviderReply | None = None  # set when succeeded
    error: BatchError | None = None  # set otherwise

    @property
    def ran(self) -> bool:
        return self.state in ("succeeded", "errored")


class BatchAdapter(Protocol):
    name: str

    async def submit(self, model: str, requests: Sequence[BatchRequest], idempotency_key: str) -> BatchHandle: ...

    async def find(self, idempotency_key: str) -> BatchHandle | None: ...

    async def poll(self, handle: BatchHandle) -> BatchStatus: ...

    async def results(self, handle: BatchHandle) -> list[BatchLine]: ...

    async def cancel(self, handle: BatchHandle) -> None: ...


# --- sending ---------------------------------------------------------------------------------
async def send(
    client: httpx.AsyncClient, provider: str, request: httpx.Request, *, timeout_s: float, secret: str | None
) -> httpx.Response:
    """Send one request, transport failures mapped; the caller reads the status."""
    with map_http_errors(provider, timeout_s=timeout_s, secrets=(secret,)):
        # As post_json: httpx's timeout is per phase, this one bounds the whole call.
        async with asyncio.timeout(timeout_s):
            return await client.send(request)


async def call_json(
    client: httpx.AsyncClient,
    provider: str,
    method: str,
    url: str,
    *,
    headers: dict[str, str],
    timeout_s: float,
    secret: str | None,
    body: dict[str, Any] | None = None,
    params: dict[str, str] | None = None,
) -> Any:
    """One JSON call: the parsed 2xx body, every failure a farebox error."""
    request = client.build_request(method, url, headers=headers, json=body, params=params, timeout=timeout_s)
    response = await send(client, provider, request, timeout_s=timeout_s, secret=secret)
    return check_response(provider, response, secrets=(secret,))


def jsonl_rows(provider: str, response: httpx.Response, secret: str | None) -> list[dict[str, Any]]:
    """A 2xx JSON-lines body as its objects; a line we cannot read fails the whole download (its
    custom_id is unknown, so the line cannot be reported alone), which a retry may fix."""
    if not 200 <= response.status_code < 300:
        check_response(provider, response, secrets=(secret,))  # raises for every non-2xx
    rows: list[dict[str, Any]] = []
    for number, raw in enumerate(response.content.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            row = None
        if not isinstance(row, dict):
            raise ProviderUnavailable(f"{provider}: malformed response (results line {number} is not a JSON object)")
        rows.append(row)
    return rows


# --- checks and lines ------------------------------------------------------------------------
def check_submit(provider: str, requests: Sequence[BatchRequest], idempotency_key: str) -> None:
    if not requests:
        raise InvalidRequest(f"{provider}: a batch needs at least one request")
    if not isinstance(idempotency_key, str) or not _ID.fullmatch(idempotency_key):
        raise InvalidRequest(f"{provider}: the idempotency key must match {ID_PATTERN}")
    seen: set[str] = set()
    for r in requests:
        if r.custom_id in seen:
            raise InvalidRequest(f"{provider}: custom_id {r.custom_id!r} appears twice in the batch")
        seen.add(r.custom_id)


def short(text: str, secret: str | None) -> str:
    text = " ".join(scrub(text, (secret,)).split())
    return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 3] + "..."


def http_error(provider: str, status: Any, body: Any, secret: str | None) -> BatchError:
    """A line's failure as the sync call's would be typed: the same status table (check_response)."""
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        return BatchError.of(ProviderUnavailable(f"{provider}: malformed response (a line without a status)"))
    try:
        # An empty body rather than "null", so the message says only the status.
        response = httpx.Response(status) if body is None else httpx.Response(status, json=body)
        check_response(provider, response, secrets=(secret,))
    except FareboxError as exc:
        return BatchError.of(exc)
    return BatchError.of(ProviderUnavailable(f"{provider}: malformed response (an error line with HTTP {status})"))


Parse = Callable[[ProviderRequest, Any], ProviderReply]


def answered(provider: str, parse: Parse, custom_id: str, model: str, body: Any) -> BatchLine:
    """A succeeded line read by the sync adapter's ``parse``. It has no prompt to count, so a reply
    without usage is estimated as if its prompt were empty: ``usage_reported`` False tells the caller
    to count the prompt it kept (the three providers' batch replies all carry usage)."""
    request = ProviderRequest(model, (), 1, 0.0, TIMEOUT_S)
    try:
        reply = parse(request, body)
    except MalformedResponse as exc:
        return failed_line(custom_id, BatchError.of(malformed(provider, exc)))
    except FareboxError as exc:  # Gemini's blocked prompt, for one
        return failed_line(custom_id, BatchError.of(exc))
    return BatchLine(custom_id=custom_id, state="succeeded", reply=reply)


def failed_line(custom_id: str, error: BatchError) -> BatchLine:
    return BatchLine(custom_id=custom_id, state="errored", error=error)


_WHY: dict[NotRun, str] = {
    "expired": "the batch expired first",
    "cancelled": "the batch was cancelled",
    "failed": "the batch failed",
}


def not_run(provider: str, custom_id: str, state: NotRun) -> BatchLine:
    # Retryable: the request itself was never tried, and the sync lane will give it its own answer.
    error = BatchError.of(ProviderUnavailable(f"{provider}: batch request not run ({_WHY[state]})"))
    return BatchLine(custom_id=custom_id, state=state, error=error)


def complete(provider: str, handle: BatchHandle, lines: Iterable[BatchLine], state: BatchState) -> list[BatchLine]:
    """The provider's lines, then one for each submitted id it left out: not run when the batch
    expired, was cancelled or failed; an error worth retrying when it says it completed."""
    found = list(lines)
    seen = {line.custom_id for line in found}
    never = NOT_RUN.get(state)
    for custom_id in handle.custom_ids:
        if custom_id in seen:
            continue
        if never is not None:
            found.append(not_run(provider, custom_id, never))
        else:
            missing = ProviderUnavailable(f"{provider}: malformed response (no result for a request of the batch)")
            found.append(failed_line(custom_id, BatchError.of(missing)))
    return found


def not_ended(provider: str, status: BatchStatus) -> ProviderUnavailable:
    return ProviderUnavailable(f"{provider}: the batch has not ended ({status.provider_status}); poll until it has")


def text_of(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def count(value: Any) -> int:
    """A count from a reply: an int, or Gemini's int64-as-string; anything else is 0."""
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
