"""The execute stage's provider calls: one adapter over one httpx client on httpx-aiohttp's transport,
and a cap on how many calls this process has in flight (``FAREBOX_PROVIDER_CONCURRENCY``).

The adapters speak httpx (``httpx.AsyncClient``, requests, responses and exceptions, and
``httpx.MockTransport`` in tests); the sockets and HTTP/1.1 parsing are aiohttp's, through the
maintained ``httpx-aiohttp`` transport (the one the OpenAI SDK's ``DefaultAioHttpClient`` uses).
httpx's own transport (httpcore over anyio) costs several times the CPU per call with hundreds of
calls in flight (its pool scans every connection per request). bench/http_client.py has the
figures, and the comparison that retired farebox's hand-written httpx transport over aiohttp: it
cost no less CPU per call than this one. What leans on a library's behaviour beyond its API is in
farebox/patches/: httpx_aiohttp_errors.py (its failures as httpx's exception types) and
httpx_cookies.py (no cookies, at no cost per response).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import urllib.request
from collections.abc import AsyncIterator, Callable

import aiohttp
import httpx
import httpx_aiohttp

from farebox.patches.httpx_aiohttp_errors import MappedErrorsTransport
from farebox.patches.httpx_cookies import drop_cookies
from farebox.providers.base import ProviderAdapter

# Below the 5 s idle timeout of uvicorn-based servers (vLLM, the emulator): a connection the server
# is closing just as a POST goes out fails that call, and aiohttp does not retry it.
KEEPALIVE_S = 4.0


def _is_ip(host: str, kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> bool:
    try:
        kind(host.split("/")[0])
    except ValueError:
        return False
    return True


def environment_proxy_mounts() -> dict[str, str | None]:
    """HTTP_PROXY, HTTPS_PROXY, ALL_PROXY and NO_PROXY as httpx mount patterns (pattern -> proxy
    URL; None: no proxy), by the rules httpx applies to its own transport (curl's, for NO_PROXY:
    ``*`` turns every proxy off, ``example.com`` covers it and its subdomains, ``.example.com``
    only the subdomains). httpx reads the environment only when it builds its own transport, so a
    client given one learns the proxies through ``mounts``; read once, as httpx reads them."""
    found = urllib.request.getproxies_environment()
    mounts: dict[str, str | None] = {}
    for scheme in ("http", "https", "all"):
        if proxy := found.get(scheme):
            mounts[f"{scheme}://"] = proxy if "://" in proxy else f"http://{proxy}"
    for host in (h.strip() for h in found.get("no", "").split(",")):
        if host == "*":
            return {}
        if not host:
            continue
        if "://" in host:
            mounts[host] = None
        elif _is_ip(host, ipaddress.IPv4Address) or host.lower() == "localhost":
            mounts[f"all://{host}"] = None
        elif _is_ip(host, ipaddress.IPv6Address):
            mounts[f"all://[{host}]"] = None
        else:
            mounts[f"all://*{host}"] = None
    return mounts


def provider_client(*, max_connections: int, timeout_s: float, keepalive_s: float = KEEPALIVE_S) -> httpx.AsyncClient:
    """The httpx client every provider adapter of a process shares: at most ``max_connections``
    connections (per proxy), certificates verified as httpx verifies them (certifi's CA bundle, or
    SSL_CERT_FILE), the environment's proxies, and no cookie kept or sent, by httpx or aiohttp."""
    ssl_context = httpx.create_ssl_context()  # built once (~30 ms of CPU), for every transport below

    def session() -> aiohttp.ClientSession:
        # Made on first use, inside the running loop. aiohttp's own jar would keep a provider's
        # cookies and send them back; trust_env stays off (it would read the environment and
        # ~/.netrc on every request: the mounts choose the proxy instead).
        connector = aiohttp.TCPConnector(limit=max_connections, ssl=ssl_context, keepalive_timeout=keepalive_s)
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    def transport(proxy: str | None) -> httpx.AsyncBaseTransport:
        inner = httpx_aiohttp.AiohttpTransport(
            verify=ssl_context, proxy=None if proxy is None else httpx.Proxy(proxy), client=session
        )
        return MappedErrorsTransport(inner)

    mounts = {
        pattern: None if proxy is None else transport(proxy) for pattern, proxy in environment_proxy_mounts().items()
    }
    return drop_cookies(httpx.AsyncClient(transport=transport(None), mounts=mounts, timeout=timeout_s))


# A slot for one call of a job in a lane, for a tenant (the execute stage's LaneSlots.slot: interactive jobs
# first, tenants by weight; farebox/stages/slots.py).
Slot = Callable[[str, str], contextlib.AbstractAsyncContextManager[None]]


class ProviderCalls:
    """One provider adapter over one client, and at most ``max_in_flight`` calls through it at once (``slot``,
    when given, decides which call goes next and may allow more: the execute stage's gives interactive jobs a
    reserve of their own; ``max_connections``, the connection pool's size, then covers it)."""

    def __init__(
        self,
        make_adapter: Callable[[httpx.AsyncClient], ProviderAdapter],
        *,
        max_in_flight: int,
        timeout_s: float,
        slot: Slot | None = None,
        max_connections: int | None = None,
    ) -> None:
        self.client = provider_client(max_connections=max_connections or max_in_flight, timeout_s=timeout_s)
        self._adapter = make_adapter(self.client)
        semaphore = asyncio.Semaphore(max_in_flight)
        self._slot: Slot = slot or (lambda lane, tenant: semaphore)

    @contextlib.asynccontextmanager
    async def adapter(self, lane: str = "background", tenant: str = "-") -> AsyncIterator[ProviderAdapter]:
        # A call cancelled mid-request closes its connection (aiohttp does not return a
        # half-read connection to its pool), so nothing here needs replacing afterwards.
        async with self._slot(lane, tenant):
            yield self._adapter

    async def aclose(self) -> None:
        await self.client.aclose()
