"""Gemini's batch mode, inline: ``models/{model}:batchGenerateContent`` with the sync adapter's
generateContent bodies, polled as the long-running operation ``batches/{id}``, results inline.

Each request carries ``metadata.custom_id``, which Gemini echoes on its response; responses also come
in request order, so the handle's ids name them when the echo is missing. The idempotency key is the
batch's ``displayName``, which the list endpoint shows, so ``find`` matches on it. A found handle
has no custom_ids, because Gemini does not return a batch's inputs. Lines of a batch that ended
without responses (failed, expired, cancelled) then cannot be named, and the caller treats each of
its own ids missing from ``results`` as not run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from farebox.providers.batch_base import HttpBatchAdapter
from farebox.providers.batch_types import (
    PAGE_SIZE,
    BatchError,
    BatchHandle,
    BatchLine,
    BatchRequest,
    BatchState,
    BatchStatus,
    failed_line,
    tally,
    text_of,
)
from farebox.providers.gemini import GeminiAdapter

STATES: dict[str, BatchState] = {
    "PENDING": "in_progress",
    "RUNNING": "in_progress",
    "SUCCEEDED": "ended",
    "FAILED": "failed",
    "EXPIRED": "expired",
    "CANCELLED": "cancelled",
}
# google.rpc.Code -> the HTTP status Google maps it to, so a line's error is typed as the sync call's.
HTTP_OF_RPC = {1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409, 11: 400}
HTTP_OF_RPC |= {12: 501, 13: 500, 14: 503, 15: 500, 16: 401}
RPC_CANCELLED = 1


class GeminiBatchAdapter(HttpBatchAdapter):
    max_bytes = 20 * 1000 * 1000  # an inline batch request is limited to 20 MB
    DEFAULT_NAME = "google"
    SYNC = GeminiAdapter
    CANCEL = ":cancel"  # a custom method of the operation, not a sub-resource
    REPLY = "the reply"  # an operation or a page of them

    # --- wire ------------------------------------------------------------------------------
    def body(self, model: str, requests: Sequence[BatchRequest], idempotency_key: str) -> dict[str, Any]:
        inlined = [
            {
                "request": self._sync.body(r.provider_request(model, self._timeout_s)),
                "metadata": {"custom_id": r.custom_id},
            }
            for r in requests
        ]
        return {"batch": {"displayName": idempotency_key, "inputConfig": {"requests": {"requests": inlined}}}}

    async def _create(self, model: str, requests: Sequence[BatchRequest], idempotency_key: str) -> str:
        path = f"/models/{quote(model.removeprefix('models/'), safe='')}:batchGenerateContent"
        operation = await self._object("POST", path, body=self.body(model, requests, idempotency_key))
        return self._required(operation, "name").removeprefix("batches/")

    def _status(self, batch: dict[str, Any]) -> BatchStatus:
        metadata = batch.get("metadata")
        word = metadata.get("state") if isinstance(metadata, dict) else None
        # BATCH_STATE_* in the REST reference; the SDKs' JOB_STATE_* names the same states.
        bare = word.removeprefix("BATCH_STATE_").removeprefix("JOB_STATE_") if isinstance(word, str) else ""
        state = STATES.get(bare)
        if state is None or not isinstance(metadata, dict):
            raise self._malformed("unknown batch state")
        counts = tally(metadata.get("batchStats"), "requestCount", "successfulRequestCount", "failedRequestCount")
        error = self._rpc_error(batch.get("error"), "batch failed") if state == "failed" else None
        return BatchStatus(state=state, counts=counts, provider_status=str(word), error=error)

    def _rpc_error(self, error: Any, what: str) -> BatchError:
        """A google.rpc.Status as the error its HTTP status would be."""
        code = error.get("code") if isinstance(error, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        status = HTTP_OF_RPC.get(code, 500) if isinstance(code, int) else 500
        detail = self._short(f"{what}: {message}" if message else what)
        return self._http_error(status, {"error": {"message": detail}})

    async def _lines(self, handle: BatchHandle, batch: dict[str, Any]) -> list[BatchLine]:
        # response.inlinedResponses.inlinedResponses; metadata.output carries the same.
        for holder in (batch.get("response"), (batch.get("metadata") or {}).get("output")):
            outer = holder.get("inlinedResponses") if isinstance(holder, dict) else None
            inner = outer.get("inlinedResponses") if isinstance(outer, dict) else None
            if isinstance(inner, list):
                return [self._line(handle, i, item) for i, item in enumerate(inner)]
        return []

    def _line(self, handle: BatchHandle, i: int, item: Any) -> BatchLine:
        metadata = item.get("metadata") if isinstance(item, dict) else None
        custom_id = text_of(metadata.get("custom_id")) if isinstance(metadata, dict) else None
        if custom_id is None and i < len(handle.custom_ids):
            custom_id = handle.custom_ids[i]  # responses come in request order
        if custom_id is None or not isinstance(item, dict):
            raise self._malformed(f"inlined response {i} names no request")
        if "response" in item:
            return self._answered(handle, custom_id, item["response"])
        error = item.get("error")
        if isinstance(error, dict) and error.get("code") == RPC_CANCELLED:
            return self._not_run(custom_id, "cancelled")
        return failed_line(custom_id, self._rpc_error(error, "batch request failed"))

    # --- find ------------------------------------------------------------------------------
    async def _page(self, cursor: str | None) -> tuple[list[Any], str | None]:
        params = {"pageSize": str(PAGE_SIZE), **({"pageToken": cursor} if cursor else {})}
        page = await self._object("GET", self.BATCHES, params=params)
        operations = page.get("operations", [])
        if not isinstance(operations, list):
            raise self._malformed("operations is not a list")
        return operations, text_of(page.get("nextPageToken"))

    def _key_of(self, batch: dict[str, Any]) -> Any:
        metadata = batch.get("metadata")
        return metadata.get("displayName") if isinstance(metadata, dict) else None

    async def _found(self, batch: dict[str, Any], idempotency_key: str) -> BatchHandle:
        metadata = batch.get("metadata")
        name = text_of(batch.get("name"))
        model = text_of(metadata.get("model")) if isinstance(metadata, dict) else None
        if name is None:
            raise self._malformed("a batch without name")
        return BatchHandle(
            provider=self.name,
            batch_id=name.removeprefix("batches/"),
            model=(model or "").removeprefix("models/"),
            idempotency_key=idempotency_key,
        )
