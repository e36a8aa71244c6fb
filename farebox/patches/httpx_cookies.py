"""The provider client's cookies: none kept, none sent, and none looked for.

Provider APIs authenticate by header and need no cookie (a load balancer's, such as Cloudflare's
``__cf_bm`` in front of OpenAI, is only a hint), and jobs of different tenants share one client, so
it must neither keep nor send what a provider sets. httpx has a public way to keep none: a
``http.cookiejar.CookieJar`` passed as ``cookies=`` is used as it is, and ``NoCookieJar`` keeps
nothing. But the client still calls ``Cookies.extract_cookies`` for every response, which first
builds urllib stand-ins of the request and the response for the jar (the request's headers decoded
into a dict, the URL parsed again): bench/http_client.py measured that at about a tenth of httpx's
CPU per provider call. So ``drop_cookies`` also swaps the client's own ``Cookies`` for
``NoCookies``, whose ``extract_cookies`` does nothing. httpx's ``cookies`` setter cannot do it: it
copies any ``Cookies`` it is given into a plain one.

| what is replaced | for | pinned by (tests/test_transport.py) |
|---|---|---|
| `AsyncClient._cookies` (private), by `NoCookies` | httpx 0.28.x | `test_the_cookie_jar_swap_takes_or_falls_back` |
| nothing (public): `cookies=NoCookieJar()` | httpx 0.28.x | `test_the_provider_client_keeps_no_cookies` |

``drop_cookies`` puts the public jar in first, so if a later httpx has no ``_cookies`` holding a
``Cookies`` the client still keeps no cookie; it then leaves the swap out and logs a warning.
"""

from __future__ import annotations

import http.cookiejar
import logging
from typing import Any

import httpx

log = logging.getLogger("farebox.patches.httpx_cookies")


class NoCookieJar(http.cookiejar.CookieJar):
    """A cookie jar that keeps and sends nothing."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None

    def add_cookie_header(self, request: Any) -> None:
        return None


class NoCookies(httpx.Cookies):
    """httpx's cookies over ``NoCookieJar``, without building anything for it per response."""

    def __init__(self) -> None:
        super().__init__(NoCookieJar())

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


def drop_cookies(client: httpx.AsyncClient) -> httpx.AsyncClient:
    """Make ``client`` keep and send no cookies, at no cost per response where httpx allows."""
    client.cookies = NoCookieJar()  # httpx uses a CookieJar it is given as it is
    if isinstance(getattr(client, "_cookies", None), httpx.Cookies):
        client._cookies = NoCookies()
    else:
        log.warning("httpx %s has no AsyncClient._cookies to swap: more CPU per call", httpx.__version__)
    return client
