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
from urllib.parse import quote

import httpx

from farebox.errors import InvalidRequest, ProviderUnavailable
from farebox.providers.anthropic import AnthropicAdapter
from farebox.providers.batch_base import (
    TIMEOUT_S,
    BatchCounts,
    BatchError,
    BatchHandle,
    BatchLine,
    BatchRequest,
    BatchState,
    BatchStatus,
    NotRun,
    answered,
    call_json,
    check_submit,
    complete,
    count,
    failed_line,
    http_error,
    jsonl_rows,
    not_ended,
    not_run,
    send,
    text_of,
)

PATH = "/messages/batches"
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


class AnthropicBatchAdapter:
    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        api_key: str | None,
        *,
        name: str = "anthropic",
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.name = name
        self._client = client
        self._base = base_url.rstrip("/") + PATH
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._sync = AnthropicAdapter(client, base_url, api_key, name=name)

    def __repr__(self) -> str:
        return f"AnthropicBatchAdapter(name={self.name!r}, url={self._base!r})"

    async def submit(self, model: str, requests: Sequence[BatchRequest], idempotency_key: str) -> BatchHandle:
        check_submit(self.name, requests, idempotency_key)
        batch = await self._json("POST", "", body={"requests": self.requests(model, requests)})
        batch_id = text_of(batch.get("id"))
        if batch_id is None:
            raise ProviderUnavailable(f"{self.name}: malformed response (missing id)")
        custom_ids = tuple(r.custom_id for r in requests)
        return BatchHandle(
            provider=self.name, batch_id=batch_id, model=model, idempotency_key=idempotency_key, custom_ids=custom_ids
        )

    async def find(self, idempotency_key: str) -> BatchHandle | None:
        return None  # see the module docstring: nothing Anthropic shows of a running batch can carry the key

    async def poll(self, handle: BatchHandle) -> BatchStatus:
        return self._status(await self._json("GET", f"/{quote(handle.batch_id, safe='')}"))

    async def results(self, handle: BatchHandle) -> list[BatchLine]:
        status = await self.poll(handle)
        if not status.ended:
            raise not_ended(self.name, status)
        # The documented path, not the batch's results_url: the key goes only where base_url says.
        url = f"{self._base}/{quote(handle.batch_id, safe='')}/results"
        request = self._client.build_request("GET", url, headers=self._sync.headers(), timeout=self._timeout_s)
        response = await send(self._client, self.name, request, timeout_s=self._timeout_s, secret=self._api_key)
        rows = jsonl_rows(self.name, response, self._api_key)
        return complete(self.name, handle, (self._line(handle, row) for row in rows), status.state)

    async def cancel(self, handle: BatchHandle) -> None:
        await self._json("POST", f"/{quote(handle.batch_id, safe='')}/cancel")  # an ended batch stays as it is

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

    def _status(self, batch: dict[str, Any]) -> BatchStatus:
        word = batch.get("processing_status")
        if word not in ("in_progress", "canceling", "ended"):
            raise ProviderUnavailable(f"{self.name}: malformed response (unknown processing_status)")
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

    def _line(self, handle: BatchHandle, row: dict[str, Any]) -> BatchLine:
        custom_id = text_of(row.get("custom_id"))
        result = row.get("result")
        if custom_id is None or not isinstance(result, dict):
            raise ProviderUnavailable(f"{self.name}: malformed response (a results line without custom_id or result)")
        kind = result.get("type")
        if kind == "succeeded":
            return answered(self.name, self._sync.parse, custom_id, handle.model, result.get("message"))
        if isinstance(kind, str) and kind in NOT_RUN_TYPES:
            return not_run(self.name, custom_id, NOT_RUN_TYPES[kind])
        if kind == "errored":
            return failed_line(custom_id, self._error(result.get("error")))
        unknown = ProviderUnavailable(f"{self.name}: malformed response (unknown result type)")
        return failed_line(custom_id, BatchError.of(unknown))

    def _error(self, error: Any) -> BatchError:
        # The sync endpoint's error body ({"type": "error", "error": {...}}), or its inner object alone.
        inner = error.get("error") if isinstance(error, dict) and isinstance(error.get("error"), dict) else error
        kind = inner.get("type") if isinstance(inner, dict) else None
        status = STATUS_OF_TYPE.get(kind, 500) if isinstance(kind, str) else 500
        return http_error(self.name, status, {"error": inner}, self._api_key)

    async def _json(self, method: str, path: str, *, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = await call_json(
            self._client,
            self.name,
            method,
            self._base + path,
            headers=self._sync.headers(),
            timeout_s=self._timeout_s,
            secret=self._api_key,
            body=body,
        )
        if not isinstance(data, dict):
            raise ProviderUnavailable(f"{self.name}: malformed response (the batch is not an object)")
        return data
