"""httpx's client API over aiohttp's connections: the transport every provider call goes through.

The adapters keep speaking httpx (``httpx.AsyncClient``, requests, responses and exceptions, and
``httpx.MockTransport`` in tests); only the sockets and HTTP/1.1 parsing are aiohttp's. httpx's
own async transport (httpcore over anyio) cost 1.76x the CPU per call of this one even with one
single-connection client per call slot, and 5.7x with one client (its pool scans every connection
per request): bench/http_client.py, 256 calls in flight against the emulator. LiteLLM and the
OpenAI SDK offer the same swap for the same reason.

aiohttp's failures are mapped to httpx's exception types here, at the boundary, as httpx's
``map_httpcore_exceptions`` does for httpcore, so ``map_http_errors`` in base.py sees the same
types whichever transport runs.
"""

from __future__ import annotations

import contextlib
import ssl
import urllib.request
from collections.abc import Iterable, Iterator
from typing import Any

import aiohttp
import httpx
import yarl

# Most specific first: the first match wins.
_EXCEPTIONS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (aiohttp.InvalidUrlClientError, httpx.UnsupportedProtocol),
    (aiohttp.ClientProxyConnectionError, httpx.ProxyError),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.RemoteProtocolError),  # body cut short, bad chunking
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),  # not HTTP, or a malformed head
    (aiohttp.ClientOSError, httpx.ReadError),
    (aiohttp.ClientError, httpx.NetworkError),
    (TimeoutError, httpx.TimeoutException),
    # aiohttp refuses to send a header with a control character (a key read with its "\r"
    # from a CRLF .env file): a request we cannot send, as httpcore's LocalProtocolError says.
    (ValueError, httpx.LocalProtocolError),
)


@contextlib.contextmanager
def map_aiohttp_exceptions(request: httpx.Request) -> Iterator[None]:
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
    # Decoded here, not by Headers.multi_items, which guesses an encoding over every header per
    # call (8% of the execute stage's CPU in a profile). httpx sends str headers as ASCII.
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One aiohttp session (made on first use, inside the running loop) with at most
    ``max_connections`` connections. Bodies are read whole: provider replies are small JSON.
    HTTP(S)_PROXY/NO_PROXY from the environment apply, as they did with httpx's own transport."""

    # Below the 5 s idle timeout of uvicorn-based servers (vLLM, the emulator): a connection the
    # server is closing just as a POST goes out fails that call, and aiohttp does not retry it.
    KEEPALIVE_S = 4.0

    def __init__(
        self, *, max_connections: int, ssl_context: ssl.SSLContext | None = None, keepalive_s: float = KEEPALIVE_S
    ) -> None:
        self._max_connections = max_connections
        # As httpx builds it by default (certifi's CA bundle); built once, ~30 ms of CPU.
        self._ssl = ssl_context or httpx.create_ssl_context()
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None
        # Read once, as httpx reads them when its client is built. aiohttp's trust_env would read
        # the environment and ~/.netrc on every request: it doubled the CPU per call.
        self._env_proxies = urllib.request.getproxies_environment()
        self._proxies: dict[tuple[str, str], str | None] = {}

    def _proxy_for(self, url: httpx.URL) -> str | None:
        key = (url.scheme, url.host)
        if key not in self._proxies:
            bypass = urllib.request.proxy_bypass(url.host)  # NO_PROXY
            self._proxies[key] = None if bypass else self._env_proxies.get(url.scheme) or self._env_proxies.get("all")
        return self._proxies[key]

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, ssl=self._ssl, keepalive_timeout=self._keepalive_s
        )
        # httpx decodes content-encoding itself (by the headers it is given), so aiohttp must
        # leave the body as it came; and httpx keeps the cookies, so aiohttp keeps none.
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
        )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {request.url.scheme!r}", request=request)
        session = self._session or self._open()
        timeout: dict[str, Any] = request.extensions.get("timeout", {})
        with map_aiohttp_exceptions(request):
            async with session.request(
                # httpx has parsed and percent-encoded the URL already: aiohttp need not again.
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
        # Raw bytes: a provider's header that is not ASCII must not fail the call.
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
