"""Anthropic's Message Batches API: ``{custom_id, params}`` requests with the sync adapter's bodies as
params, and the results JSON lines (``succeeded`` / ``errored`` / ``canceled`` / ``expired``).

``find`` cannot match the idempotency key. A message batch has no metadata, and nothing the list endpoint
shows (id, counts, times) can carry the key; the custom_ids are only readable from the results, which exist
once the batch has ended. Given a ``FindHint`` (when the create call went out, how many requests), it takes
the one batch made since with that many requests; with none or several it answers None and the caller
submits again (one duplicate batch at worst, whose answers the caller's per-job dedup drops).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from farebox.errors import InvalidRequest
from farebox.providers.anthropic import AnthropicAdapter
from farebox.providers.batch_base import HttpBatchAdapter
from farebox.providers.batch_types import (
    FIND_PAGES,
    PAGE_SIZE,
    BatchCounts,
    BatchError,
    BatchHandle,
    BatchLine,
    BatchRequest,
    BatchState,
    BatchStatus,
    FindHint,
    NotRun,
    count,
    failed_line,
    text_of,
)

# The HTTP status each of Anthropic's error types comes with, so an errored line is typed as the sync
# call's would be; a type not listed counts as a server error.
STATUS_OF_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
NOT_RUN_TYPES: dict[str, NotRun] = {"canceled": "cancelled", "expired": "expired"}
CLOCK_SKEW_S = 60.0  # between this host's clock and Anthropic's, when matching a batch's created_at


def _unix_time(value: Any) -> float | None:
    """An RFC 3339 time ("2026-12-02T18:00:00.123Z") as unix time; None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class AnthropicBatchAdapter(HttpBatchAdapter):
    max_requests = 100_000  # Message Batches' limits: 100,000 requests or 256 MB
    max_bytes = 256 * 1024 * 1024
    DEFAULT_NAME = "anthropic"
    SYNC = AnthropicAdapter
    PATH = "/messages/batches"
    BATCHES = ""  # PATH is the batches' own

    async def find(self, idempotency_key: str, hint: FindHint | None = None) -> BatchHandle | None:
        """Nothing Anthropic shows of a running batch can carry the key (module docstring), so with a ``hint``
        the one batch made since the create call went out with that many requests is taken for it; none, or
        more than one, is None. A wrong match is safe: none of its lines is one of ours, so each of our jobs
        comes back as an error line worth retrying, which the caller sends to the synchronous lane."""
        if hint is None:
            return None
        matches: list[str] = []
        cursor: str | None = None
        for _ in range(FIND_PAGES):
            batches, cursor = await self._page(cursor)
            for batch in batches:
                if isinstance(batch, dict) and self._made_as(batch, hint):
                    if (batch_id := self._required(batch, "id")) not in hint.taken:
                        matches.append(batch_id)
            if cursor is None:
                break
        if len(matches) != 1:
            return None
        return BatchHandle(provider=self.name, batch_id=matches[0], model="", idempotency_key=idempotency_key)

    def _made_as(self, batch: dict[str, Any], hint: FindHint) -> bool:
        created = _unix_time(batch.get("created_at"))
        return (
            created is not None
            and created >= hint.created_after - CLOCK_SKEW_S
            and (self._status(batch).counts.total == hint.requests)
        )

    async def _page(self, cursor: str | None) -> tuple[list[Any], str | None]:
        params = {"limit": str(PAGE_SIZE), **({"after_id": cursor} if cursor else {})}
        page = await self._json("GET", "", params=params)
        batches = page.get("data") if isinstance(page, dict) else None
        if not isinstance(batches, list):
            raise self._malformed("missing data")
        return batches, text_of(page.get("last_id")) if page.get("has_more") else None

    # --- wire ------------------------------------------------------------------------------
    def requests(self, model: str, requests: Sequence[BatchRequest]) -> list[dict[str, Any]]:
        out = []
        for r in requests:
            try:
                params = self._sync.body(r.provider_request(model, self._timeout_s))
            except InvalidRequest as exc:  # only system messages: name the request, as the batch refuses all
                raise InvalidRequest(f"{exc} (custom_id {r.custom_id!r})") from None
            out.append({"custom_id": r.custom_id, "params": params})
        return out

    async def _create(self, model: str, requests: Sequence[BatchRequest], idempotency_key: str) -> str:
        return self._required(await self._object("POST", "", body={"requests": self.requests(model, requests)}), "id")

    def _status(self, batch: dict[str, Any]) -> BatchStatus:
        word = batch.get("processing_status")
        if word not in ("in_progress", "canceling", "ended"):
            raise self._malformed("unknown processing_status")
        raw = batch.get("request_counts")
        counts = {k: count(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        failed = counts.get("errored", 0) + counts.get("canceled", 0) + counts.get("expired", 0)
        succeeded = counts.get("succeeded", 0)
        tally = BatchCounts(total=counts.get("processing", 0) + succeeded + failed, succeeded=succeeded, failed=failed)
        # Anthropic ends every batch as "ended"; how it ended is in the cancel time and the counts.
        state: BatchState = "in_progress"
        if word == "ended":
            if batch.get("cancel_initiated_at"):
                state = "cancelled"
            else:
                state = "expired" if counts.get("expired", 0) else "ended"
        return BatchStatus(state=state, counts=tally, provider_status=str(word))

    async def _lines(self, handle: BatchHandle, batch: dict[str, Any]) -> list[BatchLine]:
        # The documented path, not the batch's results_url: the key goes only where base_url says.
        return [self._line(handle, row) for row in await self._rows(f"{self._batch_path(handle)}/results")]

    def _line(self, handle: BatchHandle, row: dict[str, Any]) -> BatchLine:
        custom_id = text_of(row.get("custom_id"))
        result = row.get("result")
        if custom_id is None or not isinstance(result, dict):
            raise self._malformed("a results line without custom_id or result")
        kind = result.get("type")
        if kind == "succeeded":
            return self._answered(handle, custom_id, result.get("message"))
        if isinstance(kind, str) and kind in NOT_RUN_TYPES:
            return self._not_run(custom_id, NOT_RUN_TYPES[kind])
        if kind == "errored":
            return failed_line(custom_id, self._error(result.get("error")))
        return failed_line(custom_id, BatchError.of(self._malformed("unknown result type")))

    def _error(self, error: Any) -> BatchError:
        # The sync endpoint's error body ({"type": "error", "error": {...}}), or its inner object alone.
        inner = error.get("error") if isinstance(error, dict) and isinstance(error.get("error"), dict) else error
        kind = inner.get("type") if isinstance(inner, dict) else None
        status = STATUS_OF_TYPE.get(kind, 500) if isinstance(kind, str) else 500
        return self._http_error(status, {"error": inner})
