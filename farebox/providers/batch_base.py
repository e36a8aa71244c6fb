"""What every provider batch adapter shares: ``HttpBatchAdapter``, the ``BatchAdapter`` Protocol's five calls
(farebox/providers/batch_types.py) written once over the HTTP and per-line error mapping of base.py.

A batch is many sync calls answered later and cheaper. Each request is built by the sync adapter's own
``body`` and each answer read by its own ``parse``, so a batch line and a sync call of one prompt give
the same ``ProviderReply``. A line that failed is typed as a sync call's failure would be (the same
status table, ``check_response``), and a line that never ran (its batch expired, was cancelled or
failed) comes back marked so: the caller sends those to the synchronous lane.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Protocol
from urllib.parse import quote

import httpx

from farebox.errors import FareboxError, ProviderUnavailable
from farebox.providers.base import (
    DETAIL_CHARS,
    JsonAdapter,
    MalformedResponse,
    ProviderRequest,
    check_response,
    malformed,
    map_http_errors,
    scrub,
)
from farebox.providers.batch_types import (
    FIND_PAGES,
    NOT_RUN,
    TIMEOUT_S,
    BatchError,
    BatchHandle,
    BatchLine,
    BatchRequest,
    BatchState,
    BatchStatus,
    FindHint,
    NotRun,
    check_submit,
    failed_line,
    text_of,
)


class SyncFactory(Protocol):
    """The sync adapters' constructor, which each batch adapter calls with its own arguments."""

    def __call__(self, client: httpx.AsyncClient, base_url: str, api_key: str | None, *, name: str) -> JsonAdapter: ...


_WHY: dict[NotRun, str] = {
    "expired": "the batch expired first",
    "cancelled": "the batch was cancelled",
    "failed": "the batch failed",
}


class HttpBatchAdapter:
    """A ``BatchAdapter`` over one provider's HTTP batch API. The order of the calls and what is
    checked lives here, so the three providers cannot drift apart; a subclass names its sync adapter
    and paths, and reads its provider's wire format in the hooks (``_create``, ``_status``,
    ``_lines``, and ``_page`` / ``_key_of`` / ``_found`` for ``find``)."""

    DEFAULT_NAME: ClassVar[str]
    SYNC: ClassVar[SyncFactory]
    PATH: ClassVar[str] = ""  # after base_url: where the batch API lives (the repr's url)
    BATCHES: ClassVar[str] = "/batches"  # under PATH: one batch is BATCHES/{id}
    CANCEL: ClassVar[str] = "/cancel"  # after a batch's path
    REPLY: ClassVar[str] = "the batch"  # names a reply that is not a JSON object, in the error
    max_requests: int = 50_000  # OpenAI's limits on one batch (its input file: 200 MB)
    max_bytes: int = 200 * 1024 * 1024

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        api_key: str | None,
        *,
        name: str | None = None,  # the provider's configured name; DEFAULT_NAME when not given
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.name = self.DEFAULT_NAME if name is None else name
        self._client = client
        self._base = base_url.rstrip("/") + self.PATH
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._sync = type(self).SYNC(client, base_url, api_key, name=self.name)  # bodies, headers and parsing

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, url={self._base!r})"

    # --- the Protocol ----------------------------------------------------------------------
    async def submit(self, model: str, requests: Sequence[BatchRequest], idempotency_key: str) -> BatchHandle:
        check_submit(self.name, requests, idempotency_key)
        batch_id = await self._create(model, requests, idempotency_key)
        custom_ids = tuple(r.custom_id for r in requests)
        return BatchHandle(
            provider=self.name, batch_id=batch_id, model=model, idempotency_key=idempotency_key, custom_ids=custom_ids
        )

    async def find(self, idempotency_key: str, hint: FindHint | None = None) -> BatchHandle | None:
        cursor: str | None = None
        for _ in range(FIND_PAGES):
            batches, cursor = await self._page(cursor)
            for batch in batches:
                if isinstance(batch, dict) and self._key_of(batch) == idempotency_key:
                    return await self._found(batch, idempotency_key)
            if cursor is None:
                return None
        return None

    async def poll(self, handle: BatchHandle) -> BatchStatus:
        return self._status(await self._object("GET", self._batch_path(handle)))

    async def results(self, handle: BatchHandle) -> list[BatchLine]:
        batch = await self._object("GET", self._batch_path(handle))
        status = self._status(batch)
        if not status.ended:
            raise ProviderUnavailable(
                f"{self.name}: the batch has not ended ({status.provider_status}); poll until it has"
            )
        return self._complete(handle, await self._lines(handle, batch), status.state)

    async def cancel(self, handle: BatchHandle) -> None:
        await self._object("POST", self._batch_path(handle) + self.CANCEL)  # an ended batch stays as it is

    # --- hooks: the provider's wire format -------------------------------------------------
    async def _create(self, model: str, requests: Sequence[BatchRequest], idempotency_key: str) -> str:
        """Create the batch of checked requests; its id."""
        raise NotImplementedError

    def _status(self, batch: dict[str, Any]) -> BatchStatus:
        raise NotImplementedError

    async def _lines(self, handle: BatchHandle, batch: dict[str, Any]) -> list[BatchLine]:
        """The lines the provider reports for an ended batch (``_complete`` adds those it left out)."""
        raise NotImplementedError

    async def _page(self, cursor: str | None) -> tuple[list[Any], str | None]:
        """One page of the newest batches, and the cursor of the next (None after the last)."""
        raise NotImplementedError

    def _key_of(self, batch: dict[str, Any]) -> Any:
        raise NotImplementedError

    async def _found(self, batch: dict[str, Any], idempotency_key: str) -> BatchHandle:
        raise NotImplementedError

    # --- lines -----------------------------------------------------------------------------
    def _malformed(self, what: str) -> ProviderUnavailable:
        return ProviderUnavailable(f"{self.name}: malformed response ({what})")

    def _required(self, data: Any, key: str) -> str:
        value = text_of(data.get(key)) if isinstance(data, dict) else None
        if value is None:
            raise self._malformed(f"missing {key}")
        return value

    def _short(self, text: str) -> str:
        text = " ".join(scrub(text, (self._api_key,)).split())
        return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 3] + "..."

    def _http_error(self, status: Any, body: Any) -> BatchError:
        """A line's failure as the sync call's would be typed: the same status table (check_response)."""
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            return BatchError.of(self._malformed("a line without a status"))
        try:
            # An empty body rather than "null", so the message says only the status.
            response = httpx.Response(status) if body is None else httpx.Response(status, json=body)
            check_response(self.name, response, secrets=(self._api_key,))
        except FareboxError as exc:
            return BatchError.of(exc)
        return BatchError.of(self._malformed(f"an error line with HTTP {status}"))

    def _answered(self, handle: BatchHandle, custom_id: str, body: Any) -> BatchLine:
        """A succeeded line read by the sync adapter's ``parse``. It has no prompt to count, so a reply
        without usage is estimated as if its prompt were empty: ``usage_reported`` False tells the caller
        to count the prompt it kept (the three providers' batch replies all carry usage)."""
        request = ProviderRequest(handle.model, (), 1, 0.0, TIMEOUT_S)
        try:
            reply = self._sync.parse(request, body)
        except MalformedResponse as exc:
            return failed_line(custom_id, BatchError.of(malformed(self.name, exc)))
        except FareboxError as exc:  # Gemini's blocked prompt, for one
            return failed_line(custom_id, BatchError.of(exc))
        return BatchLine(custom_id=custom_id, state="succeeded", reply=reply)

    def _not_run(self, custom_id: str, state: NotRun) -> BatchLine:
        # Retryable: the request itself was never tried, and the sync lane will give it its own answer.
        error = BatchError.of(ProviderUnavailable(f"{self.name}: batch request not run ({_WHY[state]})"))
        return BatchLine(custom_id=custom_id, state=state, error=error)

    def _complete(self, handle: BatchHandle, lines: Iterable[BatchLine], state: BatchState) -> list[BatchLine]:
        """The provider's lines, then one for each submitted id it left out: not run when the batch
        expired, was cancelled or failed; an error worth retrying when it says it completed."""
        found = list(lines)
        seen = {line.custom_id for line in found}
        never = NOT_RUN.get(state)
        for custom_id in handle.custom_ids:
            if custom_id in seen:
                continue
            if never is not None:
                found.append(self._not_run(custom_id, never))
            else:
                missing = self._malformed("no result for a request of the batch")
                found.append(failed_line(custom_id, BatchError.of(missing)))
        return found

    # --- HTTP ------------------------------------------------------------------------------
    def _batch_path(self, handle: BatchHandle) -> str:
        return f"{self.BATCHES}/{quote(handle.batch_id, safe='')}"

    async def _transmit(self, request: httpx.Request) -> httpx.Response:
        """Send one request, transport failures mapped; the caller reads the status."""
        with map_http_errors(self.name, timeout_s=self._timeout_s, secrets=(self._api_key,)):
            # As post_json: httpx's timeout is per phase, this one bounds the whole call.
            async with asyncio.timeout(self._timeout_s):
                return await self._client.send(request)

    async def _send(
        self, method: str, path: str, *, body: dict[str, Any] | None = None, params: dict[str, str] | None = None
    ) -> httpx.Response:
        headers = self._sync.headers()
        request = self._client.build_request(
            method, self._base + path, headers=headers, json=body, params=params, timeout=self._timeout_s
        )
        return await self._transmit(request)

    async def _json(
        self, method: str, path: str, *, body: dict[str, Any] | None = None, params: dict[str, str] | None = None
    ) -> Any:
        """One JSON call: the parsed 2xx body, every failure a farebox error."""
        response = await self._send(method, path, body=body, params=params)
        return check_response(self.name, response, secrets=(self._api_key,))

    async def _object(
        self, method: str, path: str, *, body: dict[str, Any] | None = None, params: dict[str, str] | None = None
    ) -> dict[str, Any]:
        data = await self._json(method, path, body=body, params=params)
        if not isinstance(data, dict):
            raise self._malformed(f"{self.REPLY} is not an object")
        return data

    async def _rows(self, path: str) -> list[dict[str, Any]]:
        """A JSON-lines download as its objects; a line we cannot read fails the whole download (its
        custom_id is unknown, so the line cannot be reported alone), which a retry may fix."""
        response = await self._send("GET", path)
        if not 200 <= response.status_code < 300:
            check_response(self.name, response, secrets=(self._api_key,))  # raises for every non-2xx
        rows: list[dict[str, Any]] = []
        for number, raw in enumerate(response.content.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
                row = None
            if not isinstance(row, dict):
                raise self._malformed(f"results line {number} is not a JSON object")
            rows.append(row)
        return rows
