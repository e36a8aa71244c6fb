"""Anthropic's Message Batches API (``/v1/messages/batches``) over the emulated messages endpoint.

Requests are ``{custom_id, params}``; the shape of the list is checked at creation (400), each
``params`` only when it runs, as Anthropic does: a request the sync endpoint refuses comes back
``errored`` with that endpoint's error body. Counts stay ``processing`` until the whole batch ends,
and ``results_url`` points back at this emulator (under the same provider prefix).

Anthropic has no failed batch status, so the batch fail fault refuses the batch at creation with
a 429 (the queue is full), the way a busy organisation's batch is refused.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

from farebox.emulator.batches import (
    WINDOW_S,
    Batch,
    BatchCall,
    BatchStore,
    Line,
    LineResult,
    by_method,
    page,
    parse_json,
    random_id,
    rfc3339,
)
from farebox.emulator.replies import Reply, json_reply, jsonl
from farebox.emulator.wire import STATUS, AnthropicWire, BadRequest, ErrorKind

ANTHROPIC = AnthropicWire()
BASE = "/v1/messages/batches"
CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
MAX_REQUESTS = 100_000
KINDS = ("succeeded", "errored", "canceled", "expired")


def _error(kind: ErrorKind, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Reply:
    return json_reply(ANTHROPIC.error(kind, message), STATUS[kind], headers)


def handle(store: BatchStore, call: BatchCall) -> Reply | None:
    """The reply for a Message Batches route, or None when the path is not one."""
    if call.tail != BASE and not call.tail.startswith(BASE + "/"):
        return None
    rest = call.tail[len(BASE) + 1 :].split("/") if call.tail != BASE else []
    if len(rest) > 2 or (len(rest) == 2 and rest[1] not in ("cancel", "results")):
        return None
    try:
        if not rest:
            return by_method(call.method, {"GET": lambda: _list(store, call), "POST": lambda: _create(store, call)})
        found = store.find(rest[0], call.provider)
        if found is None:
            return _error("not_found", f"message_batch {rest[0]!r} not found")
        batch = found
        if len(rest) == 1:
            return by_method(
                call.method,
                {"GET": lambda: json_reply(_batch_json(store, call, batch)), "DELETE": lambda: _delete(store, batch)},
            )
        if rest[1] == "cancel":
            return by_method(call.method, {"POST": lambda: _cancel(store, call, batch)})
        return by_method(call.method, {"GET": lambda: _results(store, batch)})
    except BadRequest as exc:
        return _error("invalid", exc.message)


def _create(store: BatchStore, call: BatchCall) -> Reply:
    body = parse_json(call.body)
    requests = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(requests, list) or not requests:
        raise BadRequest("requests: must be a non-empty array")
    if len(requests) > MAX_REQUESTS:
        raise BadRequest(f"requests: at most {MAX_REQUESTS} requests in one batch")
    lines: list[Line] = []
    seen: set[str] = set()
    for i, item in enumerate(requests):
        lines.append(_line(item, i, seen))
    batch = store.create(random_id("msgbatch_01", 22), call.provider, ANTHROPIC, lines, {}, invalid=False)
    if batch.fate == "fail":
        store.forget(batch)
        seconds = store.knobs.retry_after_s
        headers = ((b"retry-after", str(math.ceil(seconds)).encode()),)
        return _error("rate_limit", "emulated: too many batch requests are processing; retry later", headers)
    return json_reply(_batch_json(store, call, batch))


def _line(item: Any, i: int, seen: set[str]) -> Line:
    if not isinstance(item, dict):
        raise BadRequest(f"requests.{i}: must be an object with custom_id and params")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not CUSTOM_ID.fullmatch(custom_id):
        raise BadRequest(f"requests.{i}.custom_id: must match ^[a-zA-Z0-9_-]{{1,64}}$")
    if custom_id in seen:
        raise BadRequest(f"requests.{i}.custom_id: {custom_id!r} is not unique in the batch")
    seen.add(custom_id)
    params = item.get("params")
    if not isinstance(params, dict):
        raise BadRequest(f"requests.{i}.params: Field required")
    try:
        return Line(custom_id, ANTHROPIC.parse(params, None))
    except BadRequest as exc:  # answered as an errored result, not refused here
        return Line(custom_id, None, exc)


def _batch_json(store: BatchStore, call: BatchCall, batch: Batch) -> dict[str, Any]:
    now = store.clock()
    results = store.results(batch, now)
    # Every request counts as processing until the whole batch ends, as Anthropic reports them.
    tally: Counter[str] = Counter(r.kind for r in results or ())
    counts = {"processing": len(batch.lines) - tally.total(), **{kind: tally[kind] for kind in KINDS}}
    if results is None:
        status = "canceling" if batch.cancel_at is not None else "in_progress"
    else:
        status = "ended"
    return {
        "id": batch.id,
        "type": "message_batch",
        "processing_status": status,
        "request_counts": counts,
        "ended_at": None if results is None else rfc3339(batch.end),
        "created_at": rfc3339(batch.created),
        "expires_at": rfc3339(batch.created + WINDOW_S),
        "archived_at": None,
        "cancel_initiated_at": None if batch.cancel_at is None else rfc3339(batch.cancel_at),
        "results_url": None if results is None else call.url(f"{BASE}/{batch.id}/results"),
    }


def _result(r: LineResult) -> dict[str, Any]:
    if r.kind == "succeeded":
        return {"type": "succeeded", "message": r.body}
    if r.kind == "errored":
        return {"type": "errored", "error": r.body}  # the sync endpoint's {"type": "error", "error": {...}}
    return {"type": r.kind}


def _results(store: BatchStore, batch: Batch) -> Reply:
    results = store.results(batch, store.clock())
    if results is None:
        return _error("invalid", f"Message Batch {batch.id} has not ended yet; its results are not ready")
    rows = [{"custom_id": r.custom_id, "result": _result(r)} for r in results]
    return Reply(200, jsonl(rows), b"application/binary")


def _cancel(store: BatchStore, call: BatchCall, batch: Batch) -> Reply:
    batch.cancel(store.clock())  # an ended batch stays as it is
    return json_reply(_batch_json(store, call, batch))


def _delete(store: BatchStore, batch: Batch) -> Reply:
    if not batch.ended(store.clock()):
        return _error("invalid", f"Message Batch {batch.id} is still processing; cancel it before deleting it")
    del store.batches[batch.id]
    return json_reply({"id": batch.id, "type": "message_batch_deleted"})


def _list(store: BatchStore, call: BatchCall) -> Reply:
    mine = store.newest_first(call.provider)
    chosen, more = page(mine, [b.id for b in mine], call.query.get("limit"), call.query.get("after_id"))
    data = [_batch_json(store, call, b) for b in chosen]
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return json_reply({"data": data, "has_more": more, "first_id": first, "last_id": last})
