"""One httpx client per in-flight call slot, instead of one client with many connections.

httpx's connection pool scans every connection (with a readability syscall each) whenever it
assigns a request, so one client serving N concurrent calls costs O(N) per call. Measured here
against the emulator with 64 calls in flight: 7.6 ms CPU per call through one client with 64
connections, 1.2 ms through 64 single-connection clients. A slot is taken for the whole call,
so the pool also caps the provider concurrency of this process.

The clients share one SSL context: building one loads the CA bundle (~30 ms of CPU), and with a
client per slot that was a quarter of the execute stage's CPU in a 4,000-job profile.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable

import httpx

from workers.providers.base import ProviderAdapter


class AdapterPool:
    def __init__(self, make_adapter: Callable[[httpx.AsyncClient], ProviderAdapter], *, size: int,
                 timeout_s: float) -> None:
        self._make = make_adapter
        self._timeout_s = timeout_s
        self._size = size
        self._free: asyncio.Queue[tuple[httpx.AsyncClient, ProviderAdapter]] = asyncio.Queue()
        self._clients: list[httpx.AsyncClient] = []
        self._closing: set[asyncio.Task[None]] = set()
        self._ssl: ssl.SSLContext | None = None

    @contextlib.asynccontextmanager
    async def adapter(self) -> AsyncIterator[ProviderAdapter]:
        if self._free.empty() and len(self._clients) < self._size:
            self._add()
        client, adapter = await self._free.get()
        try:
            yield adapter
        except asyncio.CancelledError:
            # A call cancelled mid-request (its consumer went away with a dropped broker
            # connection) can leave httpcore's pool holding a dead slot; with one connection
            # per client that client would wait forever. Replace it instead of reusing it.
            self._clients.remove(client)
            self._closing.add(asyncio.get_running_loop().create_task(client.aclose()))
            raise
        except BaseException:
            self._free.put_nowait((client, adapter))  # a provider error leaves the client healthy
            raise
        self._free.put_nowait((client, adapter))

    def _add(self) -> None:
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context()  # as httpx builds it by default (certifi's CA bundle)
        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                                   timeout=self._timeout_s, verify=self._ssl)
        self._clients.append(client)
        self._free.put_nowait((client, self._make(client)))

    async def aclose(self) -> None:
        await asyncio.gather(*self._closing, return_exceptions=True)
        for client in self._clients:
            await client.aclose()
