"""CPU per provider call of the HTTP client set-ups the execute stage could use, against the emulator
over loopback with many calls in flight, in alternating runs (the order rotates from run to run).
Prints a table and writes bench/results/http_client.md.

    .venv/bin/python bench/http_client.py --calls 1000 --in-flight 64 256 --runs 7

* httpx, one client: one httpx.AsyncClient on httpx's own transport (httpcore) with a connection per
  call in flight;
* farebox transport (before): the hand-written httpx transport over aiohttp the execute stage used
  until this comparison retired it (it was workers/providers/transport.py before this change; a copy is kept here,
  marked BENCH_ONLY, so the comparison can be re-run), with the client's cookie-jar swap;
* httpx-aiohttp (now): the maintained aiohttp transport for httpx (the OpenAI SDK's), as the execute
  stage builds it (farebox/providers/calls.py ``provider_client``: failures mapped, no cookies);
* httpx-aiohttp, public cookie jar only: the same without the swap of httpx's private
  ``client._cookies`` (farebox/patches/httpx_cookies.py), which shows what that swap is worth;
* httpx-aiohttp, as shipped: the package's own ``HttpxAiohttpClient`` with its defaults;
* aiohttp alone: the floor, without httpx's request and response objects.

A second table times the cookie handling alone, per response, as httpx's client calls it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import statistics
import time
import timeit
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import aiohttp
import httpx
import httpx_aiohttp
import uvloop
import yarl
from common import cores, cpu_s, emulator_process, pids_of, publish_table, spread, wait_for_emulator

from farebox.patches.httpx_cookies import NoCookieJar, NoCookies, drop_cookies
from farebox.providers.base import json_request
from farebox.providers.calls import provider_client

PORT = 8096
PATH = "/google/v1beta/models/gemini-2.0-flash:generateContent"
BODY = {
    "contents": [{"role": "user", "parts": [{"text": "Summarize this short text for me, please. " * 5}]}],
    "generationConfig": {"maxOutputTokens": 20},
}
HEADERS = {"x-goog-api-key": "k"}
NOW = "httpx-aiohttp (now)"
Call = Callable[[], Awaitable[object]]


# --- BENCH_ONLY: farebox's former transport, as it was (workers/providers/transport.py) ------------------------
_EXCEPTIONS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (aiohttp.InvalidUrlClientError, httpx.UnsupportedProtocol),
    (aiohttp.ClientProxyConnectionError, httpx.ProxyError),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.RemoteProtocolError),
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),
    (aiohttp.ClientOSError, httpx.ReadError),
    (aiohttp.ClientError, httpx.NetworkError),
    (TimeoutError, httpx.TimeoutException),
    (ValueError, httpx.LocalProtocolError),
)


@contextlib.contextmanager
def _map_aiohttp_exceptions(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except httpx.HTTPError:
        raise
    except Exception as exc:
        for source, target in _EXCEPTIONS:
            if isinstance(exc, source):
                raise target(str(exc) or type(exc).__name__, request=request) from exc
        raise


def _text_pairs(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]


class FareboxAiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self, *, max_connections: int, keepalive_s: float = 4.0) -> None:
        self._max_connections = max_connections
        self._ssl = httpx.create_ssl_context()
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None
        self._env_proxies = urllib.request.getproxies_environment()
        self._proxies: dict[tuple[str, str], str | None] = {}

    def _proxy_for(self, url: httpx.URL) -> str | None:
        key = (url.scheme, url.host)
        if key not in self._proxies:
            bypass = urllib.request.proxy_bypass(url.host)
            self._proxies[key] = None if bypass else self._env_proxies.get(url.scheme) or self._env_proxies.get("all")
        return self._proxies[key]

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, ssl=self._ssl, keepalive_timeout=self._keepalive_s
        )
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
        )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        timeout: dict[str, Any] = request.extensions.get("timeout", {})
        with _map_aiohttp_exceptions(request):
            async with session.request(
                request.method,
                yarl.URL(str(request.url), encoded=True),
                headers=_text_pairs(request.headers.raw),
                data=await request.aread(),
                allow_redirects=False,
                compress=None,
                proxy=self._proxy_for(request.url),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=timeout.get("pool"),
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                ),
            ) as response:
                content = await response.read()
        v = response.version
        version = f"HTTP/{v.major}.{v.minor}".encode() if v is not None else b"HTTP/1.1"
        return httpx.Response(
            response.status,
            headers=list(response.raw_headers),
            content=content,
            request=request,
            extensions={"http_version": version},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def farebox_client(in_flight: int) -> httpx.AsyncClient:
    client = httpx.AsyncClient(transport=FareboxAiohttpTransport(max_connections=in_flight), timeout=30)
    client._cookies = NoCookies()  # as workers/providers/pool.py did
    return client


# --- the set-ups measured ------------------------------------------------------------------------------------------
async def setups(url: str, in_flight: int) -> dict[str, tuple[Call, Callable[[], Awaitable[None]]]]:
    one = httpx.AsyncClient(limits=httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight))
    before = farebox_client(in_flight)
    now = provider_client(max_connections=in_flight, timeout_s=30)
    public_jar = provider_client(max_connections=in_flight, timeout_s=30)
    public_jar.cookies = NoCookieJar()  # httpx's setter: a plain Cookies over the jar, the swap undone
    shipped = httpx_aiohttp.HttpxAiohttpClient(
        limits=httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight), timeout=30
    )
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight))

    async def via(client: httpx.AsyncClient) -> object:
        # As the adapters send (farebox/providers/base.py post_json).
        response = await client.send(json_request(client, url + PATH, HEADERS, BODY, 30))
        return response.json()

    async def bare() -> object:
        async with session.post(url + PATH, headers=HEADERS, json=BODY) as response:
            return await response.json()

    return {
        "httpx, one client": (lambda: via(one), one.aclose),
        "farebox transport (before)": (lambda: via(before), before.aclose),
        NOW: (lambda: via(now), now.aclose),
        "httpx-aiohttp, public cookie jar only": (lambda: via(public_jar), public_jar.aclose),
        "httpx-aiohttp, as shipped": (lambda: via(shipped), shipped.aclose),
        "aiohttp alone": (bare, session.close),
    }


async def measure(call: Call, calls: int, in_flight: int, emulator_pids: list[int]) -> tuple[float, float, float]:
    """Client CPU ms per call, emulator CPU ms per call, calls/s."""
    gate = asyncio.Semaphore(in_flight)

    async def one() -> None:
        async with gate:
            await call()

    await asyncio.gather(*(one() for _ in range(in_flight)))  # connections open before timing
    gc.collect()
    emu0, cpu0, t0 = sum(cpu_s(p) for p in emulator_pids), time.process_time(), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(calls)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    emu = sum(cpu_s(p) for p in emulator_pids) - emu0
    return 1000 * cpu / calls, 1000 * emu / calls, calls / wall


def cookie_jar_us() -> dict[str, float]:
    """Microseconds per response that each way of keeping no cookies costs, as httpx's client runs it
    for every response (``client.cookies.extract_cookies``): a request built as the adapters build
    it, a reply with a provider's usual headers; median of 5 repeats."""
    client = httpx.AsyncClient()
    request = json_request(client, "https://generativelanguage.googleapis.com" + PATH, HEADERS, BODY, 30)
    headers = [
        ("content-type", "application/json; charset=UTF-8"),
        ("vary", "Origin, X-Origin, Referer"),
        ("date", "Thu, 27 Nov 2026 10:00:00 GMT"),
        ("server", "scaffolding on HTTPServer2"),
        ("x-xss-protection", "0"),
        ("x-frame-options", "SAMEORIGIN"),
        ("x-content-type-options", "nosniff"),
        ("server-timing", "gfet4t7; dur=412"),
        ("alt-svc", 'h3=":443"; ma=2592000'),
        ("content-length", "412"),
    ]
    response = httpx.Response(200, headers=headers, content=b"{}", request=request)
    jars = {"httpx's default jar": httpx.AsyncClient(), "NoCookieJar given as cookies= (public)": httpx.AsyncClient()}
    jars["NoCookieJar given as cookies= (public)"].cookies = NoCookieJar()
    jars["client._cookies swapped for NoCookies (now)"] = drop_cookies(httpx.AsyncClient())
    n = 20000
    return {
        name: 1e6
        * statistics.median(timeit.repeat(lambda c=c: c.cookies.extract_cookies(response), number=n, repeat=5))
        / n
        for name, c in jars.items()
    }


async def main(args: argparse.Namespace) -> None:
    results: dict[tuple[int, str], list[tuple[float, float, float]]] = {}
    with emulator_process(PORT) as url:
        await wait_for_emulator()
        emulator_pids = pids_of(f"emulator --port {PORT}")
        chosen = {n: await setups(url, n) for n in args.in_flight}
        for run in range(args.runs):
            for n, clients in chosen.items():
                names = list(clients)
                for name in names[run % len(names) :] + names[: run % len(names)]:
                    results.setdefault((n, name), []).append(
                        await measure(clients[name][0], args.calls, n, emulator_pids)
                    )
        for clients in chosen.values():
            for _, close in clients.values():
                await close()
    lines = [
        f"# HTTP client CPU per provider call ({cores()} cores, {args.runs} alternating runs, "
        f"{args.calls} calls each, emulator at 0 ms)",
        "",
        "| client | in flight | client CPU ms/call | emulator CPU ms/call | calls/s | client CPU vs now, per run |",
        "|---|---|---|---|---|---|",
    ]
    for n in args.in_flight:
        now = results[(n, NOW)]
        for name in chosen[n]:
            runs = results[(n, name)]
            ratios = [r[0] / x[0] for r, x in zip(runs, now, strict=True)]
            lines.append(
                f"| {name} | {n} | {spread([r[0] for r in runs], '.3f')} | {spread([r[1] for r in runs], '.3f')} | "
                f"{spread([r[2] for r in runs], '.0f')} | {spread(ratios, '.2f')} |"
            )
    lines += [
        "",
        "Client CPU is the benchmark process's own; the emulator runs in its own process on the same cores. "
        "The last column is the ratio to httpx-aiohttp (now) within each run (runs made side by side): "
        "median, min and max over the runs.",
        "",
        "| keeping no cookies, per response | us |",
        "|---|---|",
    ]
    lines += [f"| {name} | {us:.2f} |" for name, us in cookie_jar_us().items()]
    publish_table("http_client", "\n".join(lines) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--in-flight", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--runs", type=int, default=7)
    uvloop.run(main(ap.parse_args()))
