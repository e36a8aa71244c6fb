"""Gemini's batch mode, the inline subset: ``models/{model}:batchGenerateContent`` with
``inputConfig.requests``, polled at ``batches/{id}`` (a long-running operation), results inline.

The operation carries the batch in ``metadata`` (state ``BATCH_STATE_*``, ``batchStats`` as int64
strings) and, once done, ``response.inlinedResponses`` in request order, each the sync
generateContent reply or a ``google.rpc.Status`` error. A failed, expired or cancelled batch is done
with an ``error`` (codes 8, 4, 1) and no responses. File input (``inputConfig.fileName``) is refused.
"""

from __future__ import annotations

from typing import Any

from farebox.emulator.batches import (
    ALNUM,
    Batch,
    BatchCall,
    BatchStore,
    Line,
    LineResult,
    Status,
    by_method,
    page,
    parse_json,
    random_id,
    rfc3339,
)
from farebox.emulator.replies import Reply, json_reply
from farebox.emulator.wire import STATUS, BadRequest, ErrorKind, GeminiWire

GEMINI = GeminiWire()
BASE = "/v1beta/batches"
TYPE_BATCH = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
TYPE_OUTPUT = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"
STATES: dict[Status, str] = {
    "validating": "BATCH_STATE_PENDING",
    "in_progress": "BATCH_STATE_RUNNING",
    "finalizing": "BATCH_STATE_RUNNING",
    "cancelling": "BATCH_STATE_RUNNING",
    "completed": "BATCH_STATE_SUCCEEDED",
    "failed": "BATCH_STATE_FAILED",
    "expired": "BATCH_STATE_EXPIRED",
    "cancelled": "BATCH_STATE_CANCELLED",
}
# google.rpc.Code, which Operation.error and InlinedResponse.error carry instead of HTTP statuses.
RPC_OF_HTTP = {400: 3, 500: 13}  # INVALID_ARGUMENT, INTERNAL
ENDED_WITH: dict[Status, dict[str, Any]] = {
    "failed": {"code": 8, "message": "emulated: batch quota exhausted; the batch was not run"},
    "expired": {"code": 4, "message": "The batch expired before all of its requests ran."},
    "cancelled": {"code": 1, "message": "The batch was cancelled."},
}


def _error(kind: ErrorKind, message: str) -> Reply:
    return json_reply(GEMINI.error(kind, message), STATUS[kind])


def create(store: BatchStore, call: BatchCall, model: str) -> Reply:
    """``POST models/{model}:batchGenerateContent``: a new batch, answered as its operation."""
    try:
        spec = _field(parse_json(call.body), "batch")
        config = _field(spec, "inputConfig", "input_config")
        if "fileName" in config or "file_name" in config:
            raise BadRequest("the farebox emulator runs inlined requests only, not inputConfig.fileName")
        requests = _field(config, "requests").get("requests")
        if not isinstance(requests, list) or not requests:
            raise BadRequest("inputConfig.requests.requests must be a non-empty array")
        lines: list[Line] = []
        metadata: list[Any] = []
        for i, item in enumerate(requests):
            request = _field(item, "request") if isinstance(item, dict) else None
            if request is None:
                raise BadRequest(f"inputConfig.requests.requests[{i}] must be an object with a request")
            metadata.append(item.get("metadata"))
            try:
                lines.append(Line(str(i), GEMINI.parse(request, model)))
            except BadRequest as exc:  # answered as that request's error, as the sync endpoint would
                lines.append(Line(str(i), None, exc))
        name = spec.get("displayName", spec.get("display_name"))
    except BadRequest as exc:
        return _error("invalid", exc.message)
    info = {"model": model, "display_name": name if isinstance(name, str) else "", "metadata": metadata}
    batch = store.create(random_id("", 24, ALNUM), call.provider, GEMINI, lines, info, invalid=False)
    return json_reply(_operation(store, batch))


def _field(parent: Any, *names: str) -> dict[str, Any]:
    # The REST surface takes both the proto's JSON names and its snake_case ones.
    value = next((parent[n] for n in names if isinstance(parent, dict) and n in parent), None)
    if not isinstance(value, dict):
        raise BadRequest(f"'{names[0]}' is required and must be an object")
    return value


def handle(store: BatchStore, call: BatchCall) -> Reply | None:
    """``batches`` (list), ``batches/{id}`` (get, delete) and ``batches/{id}:cancel``."""
    if call.tail == BASE:
        return by_method(call.method, {"GET": lambda: _list(store, call)})
    segment = call.tail.removeprefix(BASE + "/")
    if segment == call.tail or "/" in segment:
        return None
    batch_id, _, action = segment.partition(":")
    if action not in ("", "cancel"):
        return None
    found = store.find(batch_id, call.provider)
    if found is None:
        return _error("not_found", f"batches/{batch_id} not found")
    batch = found
    if action == "cancel":
        return by_method(call.method, {"POST": lambda: _cancel(store, batch)})
    return by_method(
        call.method, {"GET": lambda: json_reply(_operation(store, batch)), "DELETE": lambda: _delete(store, batch)}
    )


def _operation(store: BatchStore, batch: Batch) -> dict[str, Any]:
    now = store.clock()
    status = batch.status(now)
    results = store.results(batch, now)
    info = batch.info
    if results is None:
        ok, bad = batch.progress(now)
    else:
        ok, bad = sum(r.kind == "succeeded" for r in results), sum(r.kind == "errored" for r in results)
    total = len(batch.lines)
    metadata: dict[str, Any] = {
        "@type": TYPE_BATCH,
        "model": f"models/{info['model']}",
        "name": f"batches/{batch.id}",
        "displayName": info["display_name"],
        "createTime": rfc3339(batch.created),
        "updateTime": rfc3339(min(now, batch.end)),
        "batchStats": {
            "requestCount": str(total),
            "successfulRequestCount": str(ok),
            "failedRequestCount": str(bad),
            "pendingRequestCount": str(0 if results is not None else total - ok - bad),
        },
        "state": STATES[status],
    }
    operation: dict[str, Any] = {"name": f"batches/{batch.id}", "metadata": metadata}
    if results is None:
        return operation  # proto JSON leaves out done=false
    metadata["endTime"] = rfc3339(batch.end)
    operation["done"] = True
    if status == "completed":
        responses = [_inlined(r, m) for r, m in zip(results, info["metadata"], strict=True)]
        output = {"inlinedResponses": {"inlinedResponses": responses}}
        metadata["output"] = output
        operation["response"] = {"@type": TYPE_OUTPUT, **output}
    else:
        operation["error"] = ENDED_WITH[status]
    return operation


def _inlined(result: LineResult, metadata: Any) -> dict[str, Any]:
    body = result.body or {}
    if result.kind == "succeeded":
        item: dict[str, Any] = {"response": body}
    else:
        message = body.get("error", {}).get("message", "the request was not run")
        item = {"error": {"code": RPC_OF_HTTP.get(result.status, 13), "message": message}}
    if metadata is not None:
        item["metadata"] = metadata
    return item


def _cancel(store: BatchStore, batch: Batch) -> Reply:
    batch.cancel(store.clock())  # an ended batch stays as it is
    return json_reply({})


def _delete(store: BatchStore, batch: Batch) -> Reply:
    del store.batches[batch.id]  # the operation goes, as on Gemini; it is not cancelled first
    return json_reply({})


def _list(store: BatchStore, call: BatchCall) -> Reply:
    mine = store.newest_first(call.provider)
    try:
        chosen, more = page(mine, [b.id for b in mine], call.query.get("pageSize"), call.query.get("pageToken"))
    except BadRequest as exc:
        return _error("invalid", exc.message)
    payload: dict[str, Any] = {"operations": [_operation(store, b) for b in chosen]}
    if more:
        payload["nextPageToken"] = chosen[-1].id
    return json_reply(payload)
