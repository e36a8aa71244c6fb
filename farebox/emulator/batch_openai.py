"""OpenAI's Files and Batches APIs (``/v1/files``, ``/v1/batches``) over the emulated chat completions.

An input file is JSON lines ``{custom_id, method, url, body}``; the batch validates it as OpenAI
does (a bad line fails the whole batch, with ``errors.data`` naming the line), then answers each
request as ``/v1/chat/completions`` would. Successes go to the output file, everything else to the
error file: a request the sync endpoint refuses (its 400 body), an injected server error (500), and
the requests an expired or cancelled batch never ran (``error.code`` ``batch_expired`` /
``batch_cancelled``).
"""

from __future__ import annotations

import json
from typing import Any

from farebox.emulator.batches import (
    ALNUM,
    BASE62,
    WINDOW_S,
    Batch,
    BatchCall,
    BatchStore,
    Line,
    LineResult,
    StoredFile,
    by_method,
    page,
    parse_json,
    random_id,
)
from farebox.emulator.multipart import parse_form
from farebox.emulator.replies import Reply, json_reply, jsonl
from farebox.emulator.wire import STATUS, BadRequest, ErrorKind, OpenAIWire

OPENAI = OpenAIWire()
ENDPOINT = "/v1/chat/completions"
PURPOSES = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})
HEX = "0123456789abcdef"
ENDED = frozenset({"completed", "failed", "expired", "cancelled"})
# The error-file entry of a request the batch never ran: "batch_expired" as OpenAI documents it, and
# the same shape for a cancelled batch's leftovers.
NOT_RUN = {
    "expired": {
        "code": "batch_expired",
        "message": "This request could not be executed before the completion window expired.",
    },
    "canceled": {
        "code": "batch_cancelled",
        "message": "This request was not executed because the batch was cancelled.",
    },
}


def _error(kind: ErrorKind, message: str, param: str | None = None, status: int | None = None) -> Reply:
    return json_reply(OPENAI.error(kind, message, param), status or STATUS[kind])


def handle(store: BatchStore, call: BatchCall) -> Reply | None:
    """The reply for a Files or Batches route, or None when the path is neither."""
    parts = call.tail.split("/")  # "", "v1", "files" | "batches", ...
    if len(parts) < 3 or parts[0] or parts[1] != "v1" or parts[2] not in ("files", "batches"):
        return None
    try:
        if parts[2] == "files":
            return _files(store, call, parts[3:])
        return _batches(store, call, parts[3:])
    except BadRequest as exc:
        return _error("invalid", exc.message, exc.param)


# --- files -----------------------------------------------------------------------------------
def _file_json(f: StoredFile) -> dict[str, Any]:
    return {
        "id": f.id,
        "object": "file",
        "bytes": len(f.data),
        "created_at": f.created,
        "expires_at": None,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": None,
    }


def _files(store: BatchStore, call: BatchCall, rest: list[str]) -> Reply | None:
    if not rest:
        return by_method(call.method, {"GET": lambda: _list_files(store, call), "POST": lambda: _upload(store, call)})
    if len(rest) > 2 or (len(rest) == 2 and rest[1] != "content"):
        return None
    found = store.files.get(rest[0])
    if found is None or found.provider != call.provider:
        return _error("not_found", f"No such File object: {rest[0]}", "id")
    f = found
    if len(rest) == 1:
        return by_method(call.method, {"GET": lambda: json_reply(_file_json(f)), "DELETE": lambda: _delete(store, f)})
    return by_method(call.method, {"GET": lambda: Reply(200, f.data, b"application/octet-stream")})


def _upload(store: BatchStore, call: BatchCall) -> Reply:
    form = parse_form(call.content_type, call.body)
    purpose = form.get("purpose")
    upload = form.get("file")
    if purpose is None:
        raise BadRequest("Missing required parameter: 'purpose'.", "purpose")
    if upload is None or upload.filename is None:
        raise BadRequest("Missing required parameter: 'file'.", "file")
    kind = purpose.data.decode("utf-8", "replace")
    if kind not in PURPOSES:
        raise BadRequest(f"'{kind}' is not one of {sorted(PURPOSES)} - 'purpose'", "purpose")
    if kind == "batch" and not upload.filename.endswith(".jsonl"):
        raise BadRequest("Invalid file format for Batch API. Must be .jsonl")
    f = _store_file(store, call.provider, upload.filename, kind, upload.data)
    return json_reply(_file_json(f))


def _store_file(store: BatchStore, provider: str, filename: str, purpose: str, data: bytes) -> StoredFile:
    f = StoredFile(random_id("file-", 22, BASE62), provider, filename, purpose, data, int(store.clock()))
    store.files[f.id] = f
    return f


def _delete(store: BatchStore, f: StoredFile) -> Reply:
    del store.files[f.id]
    return json_reply({"id": f.id, "object": "file", "deleted": True})


def _list_files(store: BatchStore, call: BatchCall) -> Reply:
    purpose = call.query.get("purpose")
    mine = [f for f in reversed(store.files.values()) if f.provider == call.provider]
    mine = [f for f in mine if purpose is None or f.purpose == purpose]
    if call.query.get("order") == "asc":
        mine.reverse()
    chosen, more = page(mine, [f.id for f in mine], call.query.get("limit"), call.query.get("after"))
    return json_reply(_listing([_file_json(f) for f in chosen], more))


def _listing(data: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": more}


# --- batches ---------------------------------------------------------------------------------
def _batches(store: BatchStore, call: BatchCall, rest: list[str]) -> Reply | None:
    if not rest:
        return by_method(call.method, {"GET": lambda: _list_batches(store, call), "POST": lambda: _create(store, call)})
    if len(rest) > 2 or (len(rest) == 2 and rest[1] != "cancel"):
        return None
    found = store.find(rest[0], call.provider)
    if found is None:
        return _error("not_found", f"No batch found with id '{rest[0]}'.", "batch_id")
    batch = found
    if len(rest) == 1:
        return by_method(call.method, {"GET": lambda: json_reply(_batch_json(store, batch))})
    return by_method(call.method, {"POST": lambda: _cancel(store, batch)})


def _create(store: BatchStore, call: BatchCall) -> Reply:
    body = parse_json(call.body)
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    for param in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(body.get(param), str) or not body[param]:
            raise BadRequest(f"Missing required parameter: '{param}'.", param)
    if body["endpoint"] != ENDPOINT:
        raise BadRequest(f"the farebox emulator runs {ENDPOINT} batches only, not {body['endpoint']!r}", "endpoint")
    if body["completion_window"] != "24h":
        raise BadRequest("Invalid value for 'completion_window': only '24h' is supported.", "completion_window")
    metadata = _metadata(body.get("metadata"))
    f = store.files.get(body["input_file_id"])
    if f is None or f.provider != call.provider:
        return _error("not_found", f"No such File object: {body['input_file_id']}", "input_file_id")
    if f.purpose != "batch":
        raise BadRequest("The input file must be uploaded with purpose 'batch'.", "input_file_id")
    lines, model, errors = validate_input(f.data)
    info: dict[str, Any] = {"input_file_id": f.id, "metadata": metadata, "model": model, "errors": errors}
    batch = store.create(random_id("batch_", 32, HEX), call.provider, OPENAI, lines, info, invalid=bool(errors))
    if batch.fate == "fail" and not errors:
        # The failure real batches meet most, reported at validation like a bad line.
        info["errors"] = [
            _batch_error(
                "token_limit_exceeded",
                f"Enqueued token limit reached for {model} in organization org-farebox-emulator. "
                "Please try again once some in_progress batches have been completed.",
            )
        ]
    return json_reply(_batch_json(store, batch))


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None

    def fits(key: Any, text: Any) -> bool:
        return isinstance(key, str) and isinstance(text, str) and len(key) <= 64 and len(text) <= 512

    if not isinstance(value, dict) or len(value) > 16 or not all(fits(k, v) for k, v in value.items()):
        raise BadRequest("'metadata' must map at most 16 keys (64 characters) to strings (512 characters)", "metadata")
    return dict(value)


def _batch_error(code: str, message: str, param: str | None = None, line: int | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def validate_input(data: bytes) -> tuple[list[Line], str | None, list[dict[str, Any]]]:
    """The input file's requests, their one model, and what fails validation (empty when it passes)."""
    rows = data.split(b"\n")
    while rows and not rows[-1].strip():  # the newline that ends the last line
        rows.pop()
    if not rows:
        return [], None, [_batch_error("empty_file", "The batch input file is empty.")]
    lines: list[Line] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    model: str | None = None
    for number, raw in enumerate(rows, 1):
        checked = _check_line(raw, number, seen)
        if isinstance(checked, dict):
            errors.append(checked)
            continue
        line, line_model = checked
        model = model or line_model
        if line_model != model:
            message = "The provided model does not match the model of the other requests in the batch."
            errors.append(_batch_error("mismatched_model", message, "body.model", number))
        lines.append(line)
    return lines, model, errors


def _check_line(raw: bytes, number: int, seen: set[str]) -> tuple[Line, str] | dict[str, Any]:
    try:
        item = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        item = None
    if not isinstance(item, dict):
        return _batch_error("invalid_json_line", "This line is not parseable as valid JSON.", None, number)
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        message = "Missing required parameter: 'custom_id'."
        return _batch_error("missing_required_parameter", message, "custom_id", number)
    if custom_id in seen:
        message = "The custom_id for this request is a duplicate of another request. It must be unique in a batch."
        return _batch_error("duplicate_custom_id", message, "custom_id", number)
    seen.add(custom_id)
    if item.get("method") != "POST":
        return _batch_error("invalid_method", "Only the POST method is supported.", "method", number)
    if item.get("url") != ENDPOINT:
        message = "The URL provided for this request does not match the batch endpoint."
        return _batch_error("invalid_url", message, "url", number)
    body = item.get("body")
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(body, dict) or not isinstance(model, str) or not model:
        param = "body" if not isinstance(body, dict) else "body.model"
        return _batch_error("missing_required_parameter", f"Missing required parameter: '{param}'.", param, number)
    try:
        # Checked now, answered 400 in the error file at run time, as the sync endpoint would.
        return Line(custom_id, OPENAI.parse(body, None)), model
    except BadRequest as exc:
        return Line(custom_id, None, exc), model


def _batch_json(store: BatchStore, batch: Batch) -> dict[str, Any]:
    now = store.clock()
    status = batch.status(now)
    results = store.results(batch, now)
    if results is not None:
        _write_outputs(store, batch, results)
        ok = sum(r.kind == "succeeded" for r in results)
        bad = len(results) - ok
    else:
        ok, bad = batch.progress(now)
    info = batch.info
    cancelled_early = batch.cancel_at is not None and batch.cancel_at < batch.started
    ran = batch.fate != "fail" and now >= batch.started and not cancelled_early
    total = 0 if status in ("validating", "failed") else len(batch.lines)

    def at(t: float, reached: bool) -> int | None:
        return int(t) if reached else None

    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": ENDPOINT,
        "model": info["model"],
        "errors": {"object": "list", "data": info["errors"]} if status == "failed" else None,
        "input_file_id": info["input_file_id"],
        "completion_window": "24h",
        "status": status,
        "output_file_id": info.get("output_file_id"),
        "error_file_id": info.get("error_file_id"),
        "created_at": int(batch.created),
        "in_progress_at": at(batch.started, ran),
        "expires_at": int(batch.created + WINDOW_S),
        "finalizing_at": at(batch.finalizing, status in ("finalizing", "completed")),
        "completed_at": at(batch.end, status == "completed"),
        "failed_at": at(batch.end, status == "failed"),
        "expired_at": at(batch.end, status == "expired"),
        "cancelling_at": None if batch.cancel_at is None else int(batch.cancel_at),
        "cancelled_at": at(batch.end, status == "cancelled"),
        "request_counts": {"total": total, "completed": ok, "failed": bad},
        "usage": _usage(results or ()),
        "metadata": info["metadata"],
    }


def _usage(results: tuple[LineResult, ...]) -> dict[str, Any]:
    took = sum(r.input_tokens for r in results)
    gave = sum(r.output_tokens for r in results)
    return {
        "input_tokens": took,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": gave,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": took + gave,
    }


def _write_outputs(store: BatchStore, batch: Batch, results: tuple[LineResult, ...]) -> None:
    """The output and error files, written once when the batch is first seen ended."""
    if "output_file_id" in batch.info:
        return
    done: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for r in results:
        row: dict[str, Any] = {"id": random_id("batch_req_", 32, HEX), "custom_id": r.custom_id}
        if r.body is not None:
            row["response"] = {"status_code": r.status, "request_id": random_id("", 32, ALNUM), "body": r.body}
            row["error"] = None
        else:
            row["response"], row["error"] = None, NOT_RUN[r.kind]
        (done if r.kind == "succeeded" else failed).append(row)
    for key, rows, name in (("output_file_id", done, "output"), ("error_file_id", failed, "error")):
        filename = f"{batch.id}_{name}.jsonl"
        batch.info[key] = _store_file(store, batch.provider, filename, "batch_output", jsonl(rows)).id if rows else None


def _cancel(store: BatchStore, batch: Batch) -> Reply:
    now = store.clock()
    status = batch.status(now)
    if status in ENDED and status != "cancelled":
        return _error("invalid", f"Cannot cancel a batch with status '{status}'.", status=409)
    batch.cancel(now)
    return json_reply(_batch_json(store, batch))


def _list_batches(store: BatchStore, call: BatchCall) -> Reply:
    mine = store.newest_first(call.provider)
    chosen, more = page(mine, [b.id for b in mine], call.query.get("limit"), call.query.get("after"))
    return json_reply(_listing([_batch_json(store, b) for b in chosen], more))
