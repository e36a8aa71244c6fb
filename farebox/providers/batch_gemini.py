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

import httpx

from farebox.errors import ProviderUnavailable
from farebox.providers.batch_base import (
    TIMEOUT_S,
    BatchCounts,
    BatchError,
    BatchHandle,
    BatchLine,
    BatchRequest,
    BatchState,
    BatchStatus,
    answered,
    call_json,
    check_submit,
    complete,
    count,
    failed_line,
    http_error,
    not_ended,
    not_run,
    short,
    text_of,
)
from farebox.providers.gemini import GeminiAdapter

FIND_PAGES = 5  # as batch_openai.py: the batch to resume is among the newest
PAGE_SIZE = 100
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


class GeminiBatchAdapter:
    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        api_key: str | None,
        *,
        name: str = "google",
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.name = name
        self._client = client
        self._base = base_url.rstrip("/")
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._sync = GeminiAdapter(client, base_url, api_key, name=name)

    def __repr__(self) -> str:
        return f"GeminiBatchAdapter(name={self.name!r}, url={self._base!r})"

    async def submit(self, model: str, requests: Sequence[BatchRequest], idempotency_key: str) -> BatchHandle:
        check_submit(self.name, requests, idempotency_key)
        url = f"{self._base}/models/{quote(model.removeprefix('models/'), safe='')}:batchGenerateContent"
        operation = await self._json("POST", url, body=self.body(model, requests, idempotency_key))
        name = text_of(operation.get("name"))
        if name is None:
            raise ProviderUnavailable(f"{self.name}: malformed response (missing name)")
        custom_ids = tuple(r.custom_id for r in requests)
        return BatchHandle(
            provider=self.name,
            batch_id=name.removeprefix("batches/"),
            model=model,
            idempotency_key=idempotency_key,
            custom_ids=custom_ids,
        )

    async def find(self, idempotency_key: str) -> BatchHandle | None:
        token: str | None = None
        for _ in range(FIND_PAGES):
            params = {"pageSize": str(PAGE_SIZE), **({"pageToken": token} if token else {})}
            page = await self._json("GET", f"{self._base}/batches", params=params)
            operations = page.get("operations", [])
            if not isinstance(operations, list):
                raise ProviderUnavailable(f"{self.name}: malformed response (operations is not a list)")
            for operation in operations:
                metadata = operation.get("metadata") if isinstance(operation, dict) else None
                if isinstance(metadata, dict) and metadata.get("displayName") == idempotency_key:
                    return self._found(operation, metadata, idempotency_key)
            token = text_of(page.get("nextPageToken"))
            if token is None:
                return None
        return None

    async def poll(self, handle: BatchHandle) -> BatchStatus:
        return self._status(await self._operation(handle))

    async def results(self, handle: BatchHandle) -> list[BatchLine]:
        operation = await self._operation(handle)
        status = self._status(operation)
        if not status.ended:
            raise not_ended(self.name, status)
        responses = self._responses(operation)
        lines = [self._line(handle, i, item) for i, item in enumerate(responses)]
        return complete(self.name, handle, lines, status.state)

    async def cancel(self, handle: BatchHandle) -> None:
        await self._json("POST", f"{self._base}/batches/{quote(handle.batch_id, safe='')}:cancel")

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

    def _status(self, operation: dict[str, Any]) -> BatchStatus:
        metadata = operation.get("metadata")
        word = metadata.get("state") if isinstance(metadata, dict) else None
        # BATCH_STATE_* in the REST reference; the SDKs' JOB_STATE_* names the same states.
        bare = word.removeprefix("BATCH_STATE_").removeprefix("JOB_STATE_") if isinstance(word, str) else ""
        state = STATES.get(bare)
        if state is None or not isinstance(metadata, dict):
            raise ProviderUnavailable(f"{self.name}: malformed response (unknown batch state)")
        stats = metadata.get("batchStats")
        stats = stats if isinstance(stats, dict) else {}
        tally = BatchCounts(
            total=count(stats.get("requestCount")),
            succeeded=count(stats.get("successfulRequestCount")),
            failed=count(stats.get("failedRequestCount")),
        )
        error = self._rpc_error(operation.get("error"), "batch failed") if state == "failed" else None
        return BatchStatus(state=state, counts=tally, provider_status=str(word), error=error)

    def _rpc_error(self, error: Any, what: str) -> BatchError:
        """A google.rpc.Status as the error its HTTP status would be."""
        code = error.get("code") if isinstance(error, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        status = HTTP_OF_RPC.get(code, 500) if isinstance(code, int) else 500
        detail = short(f"{what}: {message}" if message else what, self._api_key)
        return http_error(self.name, status, {"error": {"message": detail}}, self._api_key)

    def _responses(self, operation: dict[str, Any]) -> list[Any]:
        # response.inlinedResponses.inlinedResponses; metadata.output carries the same.
        for holder in (operation.get("response"), (operation.get("metadata") or {}).get("output")):
            outer = holder.get("inlinedResponses") if isinstance(holder, dict) else None
            inner = outer.get("inlinedResponses") if isinstance(outer, dict) else None
            if isinstance(inner, list):
                return inner
        return []

    def _line(self, handle: BatchHandle, i: int, item: Any) -> BatchLine:
        metadata = item.get("metadata") if isinstance(item, dict) else None
        custom_id = text_of(metadata.get("custom_id")) if isinstance(metadata, dict) else None
        if custom_id is None and i < len(handle.custom_ids):
            custom_id = handle.custom_ids[i]  # responses come in request order
        if custom_id is None or not isinstance(item, dict):
            raise ProviderUnavailable(f"{self.name}: malformed response (inlined response {i} names no request)")
        if "response" in item:
            return answered(self.name, self._sync.parse, custom_id, handle.model, item["response"])
        error = item.get("error")
        if isinstance(error, dict) and error.get("code") == RPC_CANCELLED:
            return not_run(self.name, custom_id, "cancelled")
        return failed_line(custom_id, self._rpc_error(error, "batch request failed"))

    def _found(self, operation: dict[str, Any], metadata: dict[str, Any], idempotency_key: str) -> BatchHandle:
        name, model = text_of(operation.get("name")), text_of(metadata.get("model"))
        if name is None:
            raise ProviderUnavailable(f"{self.name}: malformed response (a batch without name)")
        return BatchHandle(
            provider=self.name,
            batch_id=name.removeprefix("batches/"),
            model=(model or "").removeprefix("models/"),
            idempotency_key=idempotency_key,
        )

    # --- HTTP ------------------------------------------------------------------------------
    async def _operation(self, handle: BatchHandle) -> dict[str, Any]:
        return await self._json("GET", f"{self._base}/batches/{quote(handle.batch_id, safe='')}")

    async def _json(
        self, method: str, url: str, *, body: dict[str, Any] | None = None, params: dict[str, str] | None = None
    ) -> dict[str, Any]:
        data = await call_json(
            self._client,
            self.name,
            method,
            url,
            headers=self._sync.headers(),
            timeout_s=self._timeout_s,
            secret=self._api_key,
            body=body,
            params=params,
        )
        if not isinstance(data, dict):
            raise ProviderUnavailable(f"{self.name}: malformed response (the reply is not an object)")
        return data
