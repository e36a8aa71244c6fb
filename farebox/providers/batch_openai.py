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

from farebox.errors import FareboxError, ProviderRejected, ProviderUnavailable
from farebox.providers.base import check_response
from farebox.providers.batch_base import HttpBatchAdapter
from farebox.providers.batch_types import (
    PAGE_SIZE,
    BatchError,
    BatchHandle,
    BatchLine,
    BatchRequest,
    BatchState,
    BatchStatus,
    NotRun,
    failed_line,
    tally,
    text_of,
)
from farebox.providers.openai import OpenAIAdapter

ENDPOINT = "/v1/chat/completions"
META_KEY = "farebox_idempotency_key"
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


class OpenAIBatchAdapter(HttpBatchAdapter):
    DEFAULT_NAME = "openai"
    SYNC = OpenAIAdapter

    async def cancel(self, handle: BatchHandle) -> None:
        response = await self._send("POST", self._batch_path(handle) + self.CANCEL)
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

    async def _create(self, model: str, requests: Sequence[BatchRequest], idempotency_key: str) -> str:
        file_id = await self._upload(f"farebox-{idempotency_key}.jsonl", self.input_file(model, requests))
        body = {
            "input_file_id": file_id,
            "endpoint": ENDPOINT,
            "completion_window": "24h",
            "metadata": {META_KEY: idempotency_key},
        }
        response = await self._send("POST", self.BATCHES, body=body)
        if not 200 <= response.status_code < 300:
            # Refused with an answer, so no batch reads the file: it would only linger. After a timeout
            # the batch may exist, and its input must stay.
            await self._forget(file_id)
        return self._required(check_response(self.name, response, secrets=(self._api_key,)), "id")

    def _status(self, batch: dict[str, Any]) -> BatchStatus:
        word = batch.get("status")
        state = STATES.get(word) if isinstance(word, str) else None
        if state is None:
            raise self._malformed("unknown batch status")
        counts = tally(batch.get("request_counts"), "total", "completed", "failed")
        error = self._failure(batch) if state == "failed" else None
        return BatchStatus(state=state, counts=counts, provider_status=str(word), error=error)

    def _failure(self, batch: dict[str, Any]) -> BatchError:
        errors = batch.get("errors")
        data = errors.get("data") if isinstance(errors, dict) else None
        first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
        code, line = text_of(first.get("code")) or "unknown", first.get("line")
        detail = f"{code}: {first.get('message')}" + (f", input line {line}" if isinstance(line, int) else "")
        message = f"{self.name} batch failed ({self._short(detail)})"
        if code in RETRYABLE_FAILURES:
            return BatchError.of(ProviderUnavailable(message))
        return BatchError.of(ProviderRejected(message))  # its input was refused: resubmitting it fails again

    async def _lines(self, handle: BatchHandle, batch: dict[str, Any]) -> list[BatchLine]:
        lines: list[BatchLine] = []
        for key in ("output_file_id", "error_file_id"):
            file_id = text_of(batch.get(key))
            if file_id is not None:
                lines.extend(self._line(handle, row) for row in await self._file_rows(file_id))
        return lines

    def _line(self, handle: BatchHandle, row: dict[str, Any]) -> BatchLine:
        custom_id = text_of(row.get("custom_id"))
        if custom_id is None:
            raise self._malformed("a results line without custom_id")
        response, error = row.get("response"), row.get("error")
        if isinstance(response, dict):
            status, body = response.get("status_code"), response.get("body")
            if isinstance(status, int) and 200 <= status < 300:
                return self._answered(handle, custom_id, body)
            return failed_line(custom_id, self._http_error(status, body))
        if isinstance(error, dict):
            code = text_of(error.get("code")) or "unknown"
            if code in NOT_RUN_CODES:
                return self._not_run(custom_id, NOT_RUN_CODES[code])
            detail = self._short(f"{code}: {error.get('message')}")
            return failed_line(
                custom_id, BatchError.of(ProviderUnavailable(f"{self.name} batch request failed ({detail})"))
            )
        missing = self._malformed("a results line with neither response nor error")
        return failed_line(custom_id, BatchError.of(missing))

    # --- find ------------------------------------------------------------------------------
    async def _page(self, cursor: str | None) -> tuple[list[Any], str | None]:
        params = {"limit": str(PAGE_SIZE), **({"after": cursor} if cursor else {})}
        page = await self._json("GET", self.BATCHES, params=params)
        batches = page.get("data") if isinstance(page, dict) else None
        if not isinstance(batches, list):
            raise self._malformed("missing data")
        last = text_of(batches[-1].get("id")) if batches and isinstance(batches[-1], dict) else None
        return batches, last if page.get("has_more") else None

    def _key_of(self, batch: dict[str, Any]) -> Any:
        metadata = batch.get("metadata")
        return metadata.get(META_KEY) if isinstance(metadata, dict) else None

    async def _found(self, batch: dict[str, Any], idempotency_key: str) -> BatchHandle:
        """The handle submit returned, rebuilt: its ids and model from the input file we uploaded."""
        batch_id, file_id = text_of(batch.get("id")), text_of(batch.get("input_file_id"))
        if batch_id is None or file_id is None:
            raise self._malformed("a batch without id or input_file_id")
        rows = await self._file_rows(file_id)
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

    # --- files -----------------------------------------------------------------------------
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
        response = await self._transmit(request)
        uploaded = check_response(self.name, response, secrets=(self._api_key,))
        file_id = text_of(uploaded.get("id")) if isinstance(uploaded, dict) else None
        if file_id is None:
            raise self._malformed("the uploaded file has no id")
        return file_id

    async def _forget(self, file_id: str) -> None:
        with contextlib.suppress(FareboxError):  # best effort: the refusal is what the caller must see
            await self._json("DELETE", f"/files/{quote(file_id, safe='')}")

    async def _file_rows(self, file_id: str) -> list[dict[str, Any]]:
        return await self._rows(f"/files/{quote(file_id, safe='')}/content")
