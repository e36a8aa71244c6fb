"""The execute stage's provider calls: one adapter over one httpx client on the aiohttp transport,
and a cap on how many calls this process has in flight (``FAREBOX_PROVIDER_CONCURRENCY``).

Before the aiohttp transport this pool held one single-connection httpx client per call slot,
because httpx's own pool costs O(N) per request with N connections. aiohttp's connector has no
such cost, so one client serves every slot and the slots are a semaphore.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import httpx

from farebox.patches.httpx_transport import AiohttpTransport
from farebox.providers.base import ProviderAdapter


class NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing. Provider APIs authenticate by header and need no cookie
    (a load balancer's, such as Cloudflare's ``__cf_bm`` in front of OpenAI, is only a hint), and
    httpx parsed every reply's headers through ``http.cookiejar`` for one: 6% of the execute
    stage's CPU in a profile. The aiohttp transport keeps none either (its DummyCookieJar)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


def provider_client(transport: httpx.AsyncBaseTransport, *, timeout_s: float) -> httpx.AsyncClient:
    """The httpx client every provider adapter of a process shares."""
    client = httpx.AsyncClient(transport=transport, timeout=timeout_s)
    # httpx's `cookies` setter copies into a plain jar, so the jar itself is swapped.
    client._cookies = NoCookies()
    return client


class AdapterPool:
    def __init__(
        self, make_adapter: Callable[[httpx.AsyncClient], ProviderAdapter], *, size: int, timeout_s: float
    ) -> None:
        self.client = provider_client(AiohttpTransport(max_connections=size), timeout_s=timeout_s)
        self._adapter = make_adapter(self.client)
        self._slots = asyncio.Semaphore(size)

    @contextlib.asynccontextmanager
    async def adapter(self) -> AsyncIterator[ProviderAdapter]:
        # A call cancelled mid-request closes its connection (aiohttp does not return a
        # half-read connection to its pool), so nothing here needs replacing afterwards.
        async with self._slots:
            yield self._adapter

    async def aclose(self) -> None:
        await self.client.aclose()
