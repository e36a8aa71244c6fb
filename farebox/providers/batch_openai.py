"""OpenAI's Batch API: the requests as a JSONL file (Files API, purpose ``batch``), a batch over it
with the idempotency key in its metadata, and its output and error files read back as lines.

Each input line is ``{custom_id, method: POST, url: /v1/chat/completions, body}`` with the body the
sync adapter would POST. The output file holds the 200s; the error file the rest: a line's non-200
(typed as the sync call's would be) and, with ``error.code`` ``batch_expired`` / ``batch_cancelled``,
the requests the batch never ran.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import httpx

from farebox.errors import FareboxError, ProviderRejected, ProviderUnavailable
from farebox.providers.base import check_response
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
    short,
    text_of,
)
from farebox.providers.openai import OpenAIAdapter

ENDPOINT = "/v1/chat/completions"
META_KEY = "farebox_idempotency_key"
# find() reads this many pages of the newest batches: a batch to resume was made minutes ago, and an
# unbounded scan of an organisation's history would cost a call per hundred batches ever made.
FIND_PAGES = 5
PAGE_SIZE = 100
STATES: dict[str, BatchState] = {
    "validating": "in_progress",
    "in_progress": "in_progress",
    "finalizing": "in_progress",
    "cancelling": "in_progress",
    "completed": "ended",
    "failed": "failed",
    "expired": "expired",
    "cancelled": "cancelled",
}
NOT_RUN_CODES: dict[str, NotRun] = {"batch_expired": "expired", "batch_cancelled": "cancelled"}
# A batch failed for these has nothing wrong with its input: the organisation's queue was full.
RETRYABLE_FAILURES = frozenset({"token_limit_exceeded", "rate_limit_exceeded", "server_error"})


class OpenAIBatchAdapter:
    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        api_key: str | None,
        *,
        name: str = "openai",
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.name = name
        self._client = client
        self._base = base_url.rstrip("/")
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._sync = OpenAIAdapter(client, base_url, api_key, name=name)  # bodies and parsing are its own

    def __repr__(self) -> str:
        return f"OpenAIBatchAdapter(name={self.name!r}, url={self._base!r})"

    # --- the Protocol ----------------------------------------------------------------------
    async def submit(self, model: str, requests: Sequence[BatchRequest], idempotency_key: str) -> BatchHandle:
        check_submit(self.name, requests, idempotency_key)
        file_id = await self._upload(f"farebox-{idempotency_key}.jsonl", self.input_file(model, requests))
        body = {
            "input_file_id": file_id,
            "endpoint": ENDPOINT,
            "completion_window": "24h",
            "metadata": {META_KEY: idempotency_key},
        }
        response = await self._send("POST", "/batches", body=body)
        if not 200 <= response.status_code < 300:
            # Refused with an answer, so no batch reads the file: it would only linger. After a timeout
            # the batch may exist, and its input must stay.
            await self._forget(file_id)
        data = check_response(self.name, response, secrets=(self._api_key,))
        batch_id = text_of(data.get("id")) if isinstance(data, dict) else None
        if batch_id is None:
            raise ProviderUnavailable(f"{self.name}: malformed response (missing id)")
        custom_ids = tuple(r.custom_id for r in requests)
        return BatchHandle(
            provider=self.name, batch_id=batch_id, model=model, idempotency_key=idempotency_key, custom_ids=custom_ids
        )

    async def find(self, idempotency_key: str) -> BatchHandle | None:
        after: str | None = None
        for _ in range(FIND_PAGES):
            params = {"limit": str(PAGE_SIZE), **({"after": after} if after else {})}
            page = await self._json("GET", "/batches", params=params)
            batches = page.get("data") if isinstance(page, dict) else None
            if not isinstance(batches, list):
                raise ProviderUnavailable(f"{self.name}: malformed response (missing data)")
            for batch in batches:
                metadata = batch.get("metadata") if isinstance(batch, dict) else None
                if isinstance(metadata, dict) and metadata.get(META_KEY) == idempotency_key:
                    return await self._found(batch, idempotency_key)
            after = text_of(batches[-1].get("id")) if batches and isinstance(batches[-1], dict) else None
            if not page.get("has_more") or after is None:
                return None
        return None

    async def poll(self, handle: BatchHandle) -> BatchStatus:
        return self._status(await self._batch(handle))

    async def results(self, handle: BatchHandle) -> list[BatchLine]:
        batch = await self._batch(handle)
        status = self._status(batch)
        if not status.ended:
            raise not_ended(self.name, status)
        lines: list[BatchLine] = []
        for key in ("output_file_id", "error_file_id"):
            file_id = text_of(batch.get(key))
            if file_id is not None:
                lines.extend(self._line(handle, row) for row in await self._rows(file_id))
        return complete(self.name, handle, lines, status.state)

    async def cancel(self, handle: BatchHandle) -> None:
        response = await self._send("POST", f"/batches/{quote(handle.batch_id, safe='')}/cancel")
        if response.status_code == 409:
            return  # it has ended already: nothing is left to cancel, and retrying would not change that
        check_response(self.name, response, secrets=(self._api_key,))

    # --- wire ------------------------------------------------------------------------------
    def input_file(self, model: str, requests: Sequence[BatchRequest]) -> bytes:
        rows = (
            {
                "custom_id": r.custom_id,
                "method": "POST",
                "url": ENDPOINT,
                "body": self._sync.body(r.provider_request(model, self._timeout_s)),
            }
            for r in requests
        )
        return "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows).encode()

    def _status(self, batch: dict[str, Any]) -> BatchStatus:
        word = batch.get("status")
        state = STATES.get(word) if isinstance(word, str) else None
        if state is None:
            raise ProviderUnavailable(f"{self.name}: malformed response (unknown batch status)")
        counts = batch.get("request_counts")
        counts = counts if isinstance(counts, dict) else {}
        tally = BatchCounts(
            total=count(counts.get("total")),
            succeeded=count(counts.get("completed")),
            failed=count(counts.get("failed")),
        )
        error = self._failure(batch) if state == "failed" else None
        return BatchStatus(state=state, counts=tally, provider_status=str(word), error=error)

    def _failure(self, batch: dict[str, Any]) -> BatchError:
        errors = batch.get("errors")
        data = errors.get("data") if isinstance(errors, dict) else None
        first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
        code, line = text_of(first.get("code")) or "unknown", first.get("line")
        detail = f"{code}: {first.get('message')}" + (f", input line {line}" if isinstance(line, int) else "")
        message = f"{self.name} batch failed ({short(detail, self._api_key)})"
        if code in RETRYABLE_FAILURES:
            return BatchError.of(ProviderUnavailable(message))
        return BatchError.of(ProviderRejected(message))  # its input was refused: resubmitting it fails again

    def _line(self, handle: BatchHandle, row: dict[str, Any]) -> BatchLine:
        custom_id = text_of(row.get("custom_id"))
        if custom_id is None:
            raise ProviderUnavailable(f"{self.name}: malformed response (a results line without custom_id)")
        response, error = row.get("response"), row.get("error")
        if isinstance(response, dict):
            status, body = response.get("status_code"), response.get("body")
            if isinstance(status, int) and 200 <= status < 300:
                return answered(self.name, self._sync.parse, custom_id, handle.model, body)
            return failed_line(custom_id, http_error(self.name, status, body, self._api_key))
        if isinstance(error, dict):
            code = text_of(error.get("code")) or "unknown"
            if code in NOT_RUN_CODES:
                return not_run(self.name, custom_id, NOT_RUN_CODES[code])
            detail = short(f"{code}: {error.get('message')}", self._api_key)
            return failed_line(
                custom_id, BatchError.of(ProviderUnavailable(f"{self.name} batch request failed ({detail})"))
            )
        missing = ProviderUnavailable(
            f"{self.name}: malformed response (a results line with neither response nor error)"
        )
        return failed_line(custom_id, BatchError.of(missing))

    async def _found(self, batch: dict[str, Any], idempotency_key: str) -> BatchHandle:
        """The handle submit returned, rebuilt: its ids and model from the input file we uploaded."""
        batch_id, file_id = text_of(batch.get("id")), text_of(batch.get("input_file_id"))
        if batch_id is None or file_id is None:
            raise ProviderUnavailable(f"{self.name}: malformed response (a batch without id or input_file_id)")
        rows = await self._rows(file_id)
        custom_ids = tuple(i for i in (text_of(row.get("custom_id")) for row in rows) if i is not None)
        body = rows[0].get("body") if rows else None
        model = text_of(batch.get("model")) or (text_of(body.get("model")) if isinstance(body, dict) else None)
        return BatchHandle(
            provider=self.name,
            batch_id=batch_id,
            model=model or "",
            idempotency_key=idempotency_key,
            custom_ids=custom_ids,
        )

    # --- HTTP ------------------------------------------------------------------------------
    async def _upload(self, filename: str, data: bytes) -> str:
        request = self._client.build_request(
            "POST",
            self._base + "/files",
            headers=self._sync.headers(),
            data={"purpose": "batch"},
            files={"file": (filename, data, "application/jsonl")},
            timeout=self._timeout_s,
        )
        request.read()  # the body is in memory already: sent with its length by every transport
        response = await self._sendreq(request)
        uploaded = check_response(self.name, response, secrets=(self._api_key,))
        file_id = text_of(uploaded.get("id")) if isinstance(uploaded, dict) else None
        if file_id is None:
            raise ProviderUnavailable(f"{self.name}: malformed response (the uploaded file has no id)")
        return file_id

    async def _forget(self, file_id: str) -> None:
        with contextlib.suppress(FareboxError):  # best effort: the refusal is what the caller must see
            await self._json("DELETE", f"/files/{quote(file_id, safe='')}")

    async def _batch(self, handle: BatchHandle) -> dict[str, Any]:
        batch = await self._json("GET", f"/batches/{quote(handle.batch_id, safe='')}")
        if not isinstance(batch, dict):
            raise ProviderUnavailable(f"{self.name}: malformed response (the batch is not an object)")
        return batch

    async def _rows(self, file_id: str) -> list[dict[str, Any]]:
        response = await self._send("GET", f"/files/{quote(file_id, safe='')}/content")
        return jsonl_rows(self.name, response, self._api_key)

    async def _json(self, method: str, path: str, *, params: dict[str, str] | None = None) -> Any:
        return await call_json(
            self._client,
            self.name,
            method,
            self._base + path,
            headers=self._sync.headers(),
            timeout_s=self._timeout_s,
            secret=self._api_key,
            params=params,
        )

    async def _send(self, method: str, path: str, *, body: dict[str, Any] | None = None) -> httpx.Response:
        request = self._client.build_request(
            method, self._base + path, headers=self._sync.headers(), json=body, timeout=self._timeout_s
        )
        return await self._sendreq(request)

    async def _sendreq(self, request: httpx.Request) -> httpx.Response:
        return await send(self._client, self.name, request, timeout_s=self._timeout_s, secret=self._api_key)
