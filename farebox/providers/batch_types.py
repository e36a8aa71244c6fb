"""What a provider batch is, whatever the provider: the batch types, the ``BatchAdapter`` Protocol the batch
lane calls, and the small readers the adapters share. farebox/providers/batch_base.py drives them over HTTP."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from farebox.errors import FareboxError, InvalidRequest, RetryableError
from farebox.providers.base import ProviderReply, ProviderRequest
from farebox.schemas import ChatMessage

# Anthropic's rule for custom_id, the strictest of the three, for every provider: a caller's ids then
# fit any of them. The idempotency key follows it too (OpenAI metadata, Gemini displayName).
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_ID = re.compile(ID_PATTERN)
TIMEOUT_S = 60.0  # per HTTP call; a results file of thousands of lines takes a while to download
# find() reads this many pages of the newest batches: a batch to resume was made minutes ago, and an
# unbounded scan of an organisation's history would cost a call per hundred batches ever made.
FIND_PAGES = 5
PAGE_SIZE = 100

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


class FindHint(_Frozen):
    """What the caller knows of a batch whose create call it may have sent: for a provider whose batches
    cannot carry the idempotency key (Anthropic), ``find`` matches on these instead."""

    created_after: float  # unix time just before the create call was sent
    requests: int = Field(ge=1)
    taken: frozenset[str] = frozenset()  # provider batch ids that are other batches' already


class BatchAdapter(Protocol):
    name: str
    max_requests: int  # the provider's limits on one batch
    max_bytes: int

    async def submit(self, model: str, requests: Sequence[BatchRequest], idempotency_key: str) -> BatchHandle: ...

    async def find(self, idempotency_key: str, hint: FindHint | None = None) -> BatchHandle | None: ...

    async def poll(self, handle: BatchHandle) -> BatchStatus: ...

    async def results(self, handle: BatchHandle) -> list[BatchLine]: ...

    async def cancel(self, handle: BatchHandle) -> None: ...


# --- checks and fields -----------------------------------------------------------------------
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


def failed_line(custom_id: str, error: BatchError) -> BatchLine:
    return BatchLine(custom_id=custom_id, state="errored", error=error)


def text_of(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def count(value: Any) -> int:
    """A count from a reply: an int, or Gemini's int64-as-string; anything else is 0."""
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def tally(raw: Any, total: str, succeeded: str, failed: str) -> BatchCounts:
    """A reply's counts object read under the provider's three names; a missing one is 0."""
    counts = raw if isinstance(raw, dict) else {}
    return BatchCounts(
        total=count(counts.get(total)), succeeded=count(counts.get(succeeded)), failed=count(counts.get(failed))
    )
