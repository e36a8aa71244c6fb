"""aiohttp's failures as httpx's exception types, under httpx-aiohttp's transport.

httpx-aiohttp maps aiohttp's exceptions to httpx's, but 0.2 gets several wrong or leaves them out.
Its table maps ``ClientConnectionError`` to ``ConnectTimeout`` and prefers that over the more
specific entries, so a refused connection or a server that hung up surfaces as a *timeout* (and
``map_http_errors`` in farebox/providers/base.py says "no answer within N s"); a reply that is not
HTTP or a proxy's refusal of CONNECT (``ClientResponseError``) and a header aiohttp will not send
(``ValueError``: a key read with its "\\r") escape as aiohttp's or Python's own types, which the
adapters do not know. ``MappedErrorsTransport`` wraps the transport and maps again from the aiohttp
exception itself, most specific first, as httpx's ``map_httpcore_exceptions`` does for httpcore,
while the request is sent and while its body is read.

| mapped again here | for | pinned by (tests/test_transport.py) |
|---|---|---|
| httpx errors it raises `from` aiohttp's | httpx-aiohttp 0.2.x | `test_failures_surface_as_httpx_exceptions` |
| aiohttp errors; a refused header's `ValueError` | aiohttp 3.14.x | the same, the proxy, TLS, "\\r" tests |

The first relies on httpx-aiohttp raising its mapped exceptions ``from`` aiohttp's (its
``map_aiohttp_exceptions``); the rest is public API (``httpx.AsyncBaseTransport``,
``httpx.Response.stream``, aiohttp's exception classes).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import aiohttp
import httpx

# Most specific first: the first match wins.
_EXCEPTIONS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (aiohttp.InvalidUrlClientError, httpx.UnsupportedProtocol),
    (aiohttp.NonHttpUrlClientError, httpx.UnsupportedProtocol),
    (aiohttp.ClientProxyConnectionError, httpx.ProxyError),
    (aiohttp.ClientHttpProxyError, httpx.ProxyError),  # the proxy answered CONNECT with an error
    (aiohttp.ClientConnectorError, httpx.ConnectError),  # refused, DNS, TLS (a certificate not trusted)
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.RemoteProtocolError),  # body cut short, bad chunking
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),  # not HTTP, or a malformed head
    (aiohttp.ClientOSError, httpx.ReadError),
    (aiohttp.ClientError, httpx.NetworkError),
    (TimeoutError, httpx.TimeoutException),
)
# aiohttp refuses to send a header with a control character (a key read with its "\r" from a CRLF
# .env file) with a ValueError saying so: a request we cannot send, as httpcore's LocalProtocolError
# says. Any other ValueError is a bug and goes out as it is.
_REFUSED_HEADER = "Forbidden control character detected in headers"


@contextlib.contextmanager
def map_aiohttp_errors(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        source: BaseException = exc
        if isinstance(exc, httpx.HTTPError):
            if not isinstance(exc.__cause__, aiohttp.ClientError):
                raise  # httpx's own (a body that will not decode, ...)
            source = exc.__cause__  # httpx-aiohttp's mapping: map again from what aiohttp raised
        for kind, target in _EXCEPTIONS:
            if isinstance(source, kind):
                raise target(str(source) or type(source).__name__, request=request) from source
        if type(source) is ValueError and str(source).startswith(_REFUSED_HEADER):
            raise httpx.LocalProtocolError(str(source), request=request) from source
        raise


class _MappedStream(httpx.AsyncByteStream):
    """The response body, read with the same mapping: a body cut short fails while httpx reads it."""

    def __init__(self, stream: httpx.AsyncByteStream, request: httpx.Request) -> None:
        self._stream = stream
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with map_aiohttp_errors(self._request):
            async for chunk in self._stream:
                yield chunk

    async def aclose(self) -> None:
        with map_aiohttp_errors(self._request):
            await self._stream.aclose()


class MappedErrorsTransport(httpx.AsyncBaseTransport):
    """``inner`` (an httpx-aiohttp ``AiohttpTransport``) with its failures mapped as above."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with map_aiohttp_errors(request):
            response = await self.inner.handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _MappedStream(response.stream, request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()
