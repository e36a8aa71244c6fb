"""A lean HTTP/1.1 keep-alive load driver for the LiteLLM comparison.

The load generator shares the two cores with the system under test, so it must cost little: httpx
spent ~5.7 ms of CPU per request here (more than the proxy's own share per core), against ~0.8 ms
for farebox's AMQP client, which skewed requests/s against the proxy. This client does only what
the benchmark needs: POST a JSON body on one persistent connection and read a response framed by
Content-Length or chunked encoding. It is bench code, not a general HTTP client.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit


class HttpError(Exception):
    pass


class KeepAlive:
    """One persistent connection; one request at a time."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.fixed = "".join(
            f"{k}: {v}\r\n"
            for k, v in {"Host": f"{self.host}:{self.port}", "Content-Type": "application/json", **headers}.items()
        )
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\n{self.fixed}Content-Length: {len(data)}\r\n\r\n".encode() + data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
        if "content-length" in headers:
            payload = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            payload = await self._chunked()
        else:
            raise HttpError(f"response without a length: {status_line}")
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, payload

    async def _chunked(self) -> bytes:
        assert self.reader is not None
        out = bytearray()
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await self.reader.readexactly(size + 2)
            if size == 0:
                return bytes(out)
            out += chunk[:-2]

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
