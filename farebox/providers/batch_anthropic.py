"""Anthropic's Message Batches API: ``{custom_id, params}`` requests with the sync adapter's bodies as
params, and the results JSON lines (``succeeded`` / ``errored`` / ``canceled`` / ``expired``).

``find`` always answers None. A message batch has no metadata, and nothing the list endpoint shows
(id, counts, times) can carry the idempotency key. Putting the key in the custom_ids would not help:
they are only readable from the results, which exist once the batch has ended, so a batch still
running (the one a crashed submitter needs to find) cannot be matched. A caller that must not submit
twice records the key before ``submit`` and the handle as soon as it returns. A crash between the
two can leave one duplicate batch, and the caller's own per-job dedup takes the first answer of each
job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from farebox.errors import InvalidRequest
from farebox.providers.anthropic import AnthropicAdapter
from farebox.providers.batch_base import (
    BatchCounts,
    BatchError,
    BatchHandle,
    BatchLine,
    BatchRequest,
    BatchState,
    BatchStatus,
    HttpBatchAdapter,
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


class AnthropicBatchAdapter(HttpBatchAdapter):
    DEFAULT_NAME = "anthropic"
    SYNC = AnthropicAdapter
    PATH = "/messages/batches"
    BATCHES = ""  # PATH is the batches' own

    async def find(self, idempotency_key: str) -> BatchHandle | None:
        return None  # see the module docstring: nothing Anthropic shows of a running batch can carry the key

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
