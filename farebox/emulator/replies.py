"""What a route hands back to the ASGI layer, shared by the chat routes (app.py) and the batch APIs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

Headers = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: bytes = b"application/json"
    headers: Headers = ()


def json_reply(payload: Any, status: int = 200, headers: Headers = ()) -> Reply:
    # Compact UTF-8, as the real APIs send (and byte for byte what Starlette's JSONResponse wrote).
    body = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    return Reply(status, body, headers=headers)


def jsonl(rows: list[Any]) -> bytes:
    """JSON lines, each compact, every line ending in a newline (as the providers' result files do)."""
    return b"".join(json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for row in rows)


NOT_FOUND = Reply(404, b"Not Found", b"text/plain; charset=utf-8")


def not_allowed(allow: str) -> Reply:
    return Reply(405, b"Method Not Allowed", b"text/plain; charset=utf-8", ((b"allow", allow.encode()),))
