"""The provider client (httpx over httpx-aiohttp's transport, farebox/providers/calls.py, with the
failure mapping of farebox/patches/httpx_aiohttp_errors.py), over real sockets on loopback: what a
provider call sees for each way a server can answer or misbehave, and the execute stage's cap on
calls in flight on top of it."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import httpx
import pytest

from farebox.errors import ProviderRejected, ProviderUnavailable
from farebox.patches.httpx_cookies import NoCookieJar, NoCookies, drop_cookies
from farebox.providers.base import ProviderRequest, json_request
from farebox.providers.calls import KEEPALIVE_S, ProviderCalls, environment_proxy_mounts, provider_client
from farebox.providers.openai import OpenAIAdapter
from farebox.providers.registry import BUILTINS, build_adapter, provider_configs
from farebox.schemas import ChatMessage

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OPENAI_OK = json.dumps(
    {
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    }
).encode()


@contextlib.asynccontextmanager
async def raw_server(serve: Serve) -> AsyncIterator[str]:
    """A server that answers however ``serve`` says, bytes and all."""
    handlers: list[asyncio.Task[object]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await serve(reader, writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        server.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[list[bytes], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")[:-2]
    length = next((int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:")), 0)
    return lines, await reader.readexactly(length)


def answer(body: bytes, *, status: str = "200 OK", extra: bytes = b"") -> Serve:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(
                b"HTTP/1.1 "
                + status.encode()
                + b"\r\ncontent-type: application/json\r\n"
                + extra
                + b"content-length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            await writer.drain()

    return serve


async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    await asyncio.sleep(30)


async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 500\r\n\r\n" + OPENAI_OK[:20])
    await writer.drain()
    writer.close()


async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.close()


async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    await writer.drain()
    writer.close()


def free_port_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: connecting is refused


def request(timeout_s: float = 5.0) -> ProviderRequest:
    return ProviderRequest(
        model="m",
        messages=(ChatMessage(role="user", content="hello"),),
        max_tokens=5,
        temperature=0.0,
        timeout_s=timeout_s,
    )


@pytest.mark.parametrize(
    ("serve", "error"),
    [
        (hang, httpx.ReadTimeout),
        (cut_short, httpx.RemoteProtocolError),
        (close_at_once, httpx.RemoteProtocolError),
        (not_http, httpx.RemoteProtocolError),
        (None, httpx.ConnectError),
    ],
    ids=["no answer", "body cut short", "closed before answering", "not HTTP", "refused"],
)
async def test_failures_surface_as_httpx_exceptions(serve: Serve | None, error: type[Exception]) -> None:
    async with contextlib.AsyncExitStack() as stack:
        url = free_port_url() if serve is None else await stack.enter_async_context(raw_server(serve))
        client = await stack.enter_async_context(provider_client(max_connections=4, timeout_s=0.5))
        with pytest.raises(error):
            await client.post(url + "/v1/chat/completions", json={"x": 1})


@pytest.mark.parametrize(
    ("serve", "error", "text"),
    [
        (hang, ProviderUnavailable, "no answer"),
        (cut_short, ProviderUnavailable, "connection failed"),
        (not_http, ProviderUnavailable, "connection failed"),
        (None, ProviderUnavailable, "connection failed"),
        (answer(b'{"error": {"type": "bad", "message": "no"}}', status="400 Bad Request"), ProviderRejected, "400"),
        (answer(b"{}", status="503 Service Unavailable"), ProviderUnavailable, "503"),
        (answer(b"not gzip at all", extra=b"content-encoding: gzip\r\n"), ProviderUnavailable, "malformed"),
    ],
    ids=["no answer", "body cut short", "not HTTP", "refused", "400", "503", "bad gzip"],
)
async def test_the_adapter_maps_each_failure_to_the_error_tree(
    serve: Serve | None, error: type[Exception], text: str
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        url = free_port_url() if serve is None else await stack.enter_async_context(raw_server(serve))
        calls = ProviderCalls(
            lambda c: OpenAIAdapter(c, url + "/v1", "sk-test-0123456789"), max_in_flight=2, timeout_s=0.5
        )
        stack.push_async_callback(calls.aclose)
        async with calls.adapter() as adapter:
            with pytest.raises(error, match=text):
                await adapter.complete(request(timeout_s=0.5))


async def test_a_gzip_body_is_decoded_and_headers_are_sent_once() -> None:
    seen: list[list[bytes]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines, body = await read_request(reader)
        seen.append(lines)
        assert json.loads(body)["model"] == "m"
        packed = gzip.compress(OPENAI_OK)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
            b"content-length: " + str(len(packed)).encode() + b"\r\n\r\n" + packed
        )
        await writer.drain()

    async with raw_server(serve) as url:
        calls = ProviderCalls(
            lambda c: OpenAIAdapter(c, url + "/v1", "sk-test-0123456789"), max_in_flight=1, timeout_s=5
        )
        async with calls.adapter() as adapter:
            reply = await adapter.complete(request())
        await calls.aclose()
    assert reply.content == "hi" and reply.usage.input_tokens == 3
    names = [line.split(b":")[0].lower() for line in seen[0][1:]]
    assert len(names) == len(set(names))  # httpx's headers, none doubled by aiohttp
    assert {b"host", b"authorization", b"content-type", b"content-length", b"user-agent"} <= set(names)
    assert seen[0][0] == b"POST /v1/chat/completions HTTP/1.1"


async def test_a_response_header_that_is_not_ascii_is_fine() -> None:
    async with raw_server(answer(OPENAI_OK, extra="x-served-by: caf\u00e9\r\n".encode("latin-1"))) as url:
        calls = ProviderCalls(lambda c: OpenAIAdapter(c, url + "/v1", None), max_in_flight=1, timeout_s=5)
        async with calls.adapter() as adapter:
            reply = await adapter.complete(request())
        await calls.aclose()
    assert reply.content == "hi"


async def test_a_key_with_a_control_character_is_permanent() -> None:
    async with raw_server(answer(OPENAI_OK)) as url:
        # A key read with its "\r" from a CRLF .env file: nothing to retry.
        calls = ProviderCalls(
            lambda c: OpenAIAdapter(c, url + "/v1", "sk-test-0123456789\r"), max_in_flight=1, timeout_s=5
        )
        async with calls.adapter() as adapter:
            with pytest.raises(ProviderRejected, match="could not be sent") as info:
                await adapter.complete(request())
        await calls.aclose()
    assert "0123456789" not in str(info.value)


async def test_the_proxy_from_the_environment_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[bytes]] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines, _ = await read_request(reader)
        seen.append(lines)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: " + str(len(OPENAI_OK)).encode() + b"\r\n\r\n" + OPENAI_OK)
        await writer.drain()

    async with raw_server(proxy) as url:
        monkeypatch.setenv("HTTP_PROXY", url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        calls = ProviderCalls(
            lambda c: OpenAIAdapter(c, "http://provider.invalid/v1", None), max_in_flight=1, timeout_s=5
        )
        async with calls.adapter() as adapter:
            reply = await adapter.complete(request())
        await calls.aclose()
    assert reply.content == "hi"
    assert seen[0][0] == b"POST http://provider.invalid/v1/chat/completions HTTP/1.1"


async def test_no_proxy_hosts_are_called_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    async with raw_server(answer(OPENAI_OK)) as url:
        monkeypatch.setenv("HTTP_PROXY", free_port_url())  # nobody there: using it would fail the call
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        calls = ProviderCalls(lambda c: OpenAIAdapter(c, url + "/v1", None), max_in_flight=1, timeout_s=5)
        async with calls.adapter() as adapter:
            reply = await adapter.complete(request())
        await calls.aclose()
    assert reply.content == "hi"


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """A server-side TLS context with a certificate for 127.0.0.1 that no CA signed."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    where = tmp_path_factory.mktemp("tls")
    key, cert = where / "key.pem", where / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def test_certificates_are_verified(self_signed: ssl.SSLContext) -> None:
    server = await asyncio.start_server(answer(OPENAI_OK), "127.0.0.1", 0, ssl=self_signed)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with provider_client(max_connections=1, timeout_s=5) as client:
            with pytest.raises(httpx.ConnectError, match="certificate verify failed"):
                await client.post(url + "/v1/chat/completions", json={})
        calls = ProviderCalls(lambda c: OpenAIAdapter(c, url + "/v1", None), max_in_flight=1, timeout_s=5)
        async with calls.adapter() as adapter:
            with pytest.raises(ProviderUnavailable, match="connection failed"):
                await adapter.complete(request())
        await calls.aclose()
    finally:
        server.close()


async def test_a_bad_scheme_is_permanent() -> None:
    calls = ProviderCalls(lambda c: OpenAIAdapter(c, "ftp://nowhere/v1", None), max_in_flight=1, timeout_s=1)
    async with calls.adapter() as adapter:
        with pytest.raises(ProviderRejected, match="bad endpoint"):
            await adapter.complete(request())
    await calls.aclose()


@pytest.mark.parametrize("provider", [b.name for b in BUILTINS])
async def test_every_builtin_adapter_answers_through_the_pool(emulator: str, provider: str) -> None:
    config = provider_configs({}, emulator_url=emulator)[provider]
    calls = ProviderCalls(lambda c: build_adapter(config, c), max_in_flight=8, timeout_s=5)
    async with calls.adapter() as adapter:
        replies = await asyncio.gather(*(adapter.complete(request()) for _ in range(20)))
    await calls.aclose()
    assert all(r.content and r.usage.output_tokens > 0 for r in replies)


async def test_the_slots_are_the_cap_whatever_the_connections() -> None:
    calls = ProviderCalls(lambda c: OpenAIAdapter(c, "http://127.0.0.1:9/v1", None), max_in_flight=2, timeout_s=1)
    async with calls.adapter(), calls.adapter():
        third = asyncio.create_task(_enter(calls))
        await asyncio.sleep(0.05)
        assert not third.done()  # both slots held, though no connection is open
    await asyncio.wait_for(third, 1)
    await calls.aclose()


async def _enter(calls: ProviderCalls) -> None:
    async with calls.adapter():
        pass


async def test_slots_cap_the_calls_in_flight() -> None:
    in_flight, peak = 0, 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal in_flight, peak
        while True:
            await read_request(reader)
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.05)
            in_flight -= 1
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-length: " + str(len(OPENAI_OK)).encode() + b"\r\n\r\n" + OPENAI_OK
            )
            await writer.drain()

    async with raw_server(serve) as url:
        calls = ProviderCalls(lambda c: OpenAIAdapter(c, url + "/v1", None), max_in_flight=2, timeout_s=5)

        async def call() -> str:
            async with calls.adapter() as adapter:
                return (await adapter.complete(request())).content

        assert await asyncio.gather(*(call() for _ in range(6))) == ["hi"] * 6
        await calls.aclose()
    assert peak == 2


async def test_a_cancelled_call_frees_its_slot_and_the_pool_goes_on() -> None:
    async with raw_server(hang) as slow, raw_server(answer(OPENAI_OK)) as fast:
        calls = ProviderCalls(lambda c: OpenAIAdapter(c, slow + "/v1", None), max_in_flight=1, timeout_s=30)
        good = OpenAIAdapter(calls.client, fast + "/v1", None)

        async def hold() -> None:
            async with calls.adapter() as adapter:
                await adapter.complete(request(timeout_s=30))

        task = asyncio.create_task(hold())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(5):
            async with calls.adapter():  # the only slot is free again
                reply = await good.complete(request())
        await calls.aclose()
    assert reply.content == "hi"


async def test_the_provider_client_keeps_no_cookies() -> None:
    # A provider's load balancer sets cookies; the shared client neither keeps nor sends them
    # (jobs of different tenants share it): not httpx's jar, and not aiohttp's under it.
    sent: list[list[bytes]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            lines, _ = await read_request(reader)
            sent.append([line for line in lines if line.lower().startswith(b"cookie:")])
            writer.write(
                b"HTTP/1.1 200 OK\r\nset-cookie: __cf_bm=abc; Path=/; HttpOnly\r\n"
                b"set-cookie: session=tenant-a; Path=/\r\ncontent-length: 2\r\n\r\n{}"
            )
            await writer.drain()

    async with raw_server(serve) as url, provider_client(max_connections=1, timeout_s=5) as client:
        for _ in range(3):
            (await client.post(url + "/v1/chat", json={})).raise_for_status()
            (await client.send(json_request(client, url + "/v1/chat", {}, {}, 5))).raise_for_status()
        assert len(client.cookies) == 0
    assert sent == [[]] * 6


def test_the_cookie_jar_swap_takes_or_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    # httpx 0.28: the client's Cookies is swapped, so a response costs no cookie work at all.
    client = provider_client(max_connections=1, timeout_s=5)
    assert type(client.cookies) is NoCookies and isinstance(client.cookies.jar, NoCookieJar)

    class LaterHttpx(httpx.AsyncClient):
        """As a later httpx might keep its cookies: under another name."""

        @property
        def cookies(self) -> httpx.Cookies:
            return self.jar_elsewhere

        @cookies.setter
        def cookies(self, cookies: Any) -> None:
            self.jar_elsewhere = httpx.Cookies(cookies)

    later = LaterHttpx()
    del later._cookies
    with caplog.at_level("WARNING", logger="farebox.patches.httpx_cookies"):
        drop_cookies(later)
    assert isinstance(later.cookies.jar, NoCookieJar)  # still keeps none, through the public setter
    assert "no AsyncClient._cookies" in caplog.text


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({}, {"contents": [{"role": "user", "parts": [{"text": 'Résumé ✓ \\u2028 "quoted"'}]}]}),
        ({"authorization": "Bearer sk-test", "anthropic-version": "2023-06-01"}, {"max_tokens": 5, "temperature": 0.0}),
        ({"x-goog-api-key": "AIza-test"}, {"nested": {"list": [1, 2.5, None, True]}}),
        ({"Host": "gateway.example.test", "User-Agent": "farebox"}, {}),  # a caller's Host and User-Agent win
    ],
)
def test_json_request_is_what_post_would_send(headers: dict[str, str], body: dict[str, object]) -> None:
    client = provider_client(max_connections=1, timeout_s=7)  # never sends: no connection is opened
    ours = json_request(client, "https://api.example.test/v1/chat?x=1", headers, body, 12.5)
    theirs = client.build_request(
        "POST", "https://api.example.test/v1/chat?x=1", headers=headers, json=body, timeout=httpx.Timeout(12.5)
    )
    assert (ours.method, ours.url) == (theirs.method, theirs.url)
    # The same headers; only content-type comes before content-length (their order means nothing).
    assert sorted(ours.headers.multi_items()) == sorted(theirs.headers.multi_items())
    assert ours.content == theirs.content
    assert ours.extensions == theirs.extensions


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy variable of the developer's own environment (either case) reaches the test."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def proxy_that_answers(seen: list[list[bytes]]) -> Serve:
    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines, _ = await read_request(reader)
        seen.append(lines)
        if lines[0].startswith(b"CONNECT "):
            writer.write(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
        else:
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-length: " + str(len(OPENAI_OK)).encode() + b"\r\n\r\n" + OPENAI_OK
            )
        await writer.drain()

    return proxy


async def test_all_proxy_is_used_for_every_scheme(no_proxy_env: pytest.MonkeyPatch) -> None:
    seen: list[list[bytes]] = []
    async with raw_server(proxy_that_answers(seen)) as url:
        no_proxy_env.setenv("ALL_PROXY", url)
        calls = ProviderCalls(
            lambda c: OpenAIAdapter(c, "http://provider.invalid/v1", None), max_in_flight=1, timeout_s=5
        )
        async with calls.adapter() as adapter:
            reply = await adapter.complete(request())
        await calls.aclose()
    assert reply.content == "hi"
    assert seen[0][0] == b"POST http://provider.invalid/v1/chat/completions HTTP/1.1"


async def test_https_goes_through_the_proxy_as_connect_and_a_refusal_is_a_proxy_error(
    no_proxy_env: pytest.MonkeyPatch,
) -> None:
    seen: list[list[bytes]] = []
    async with raw_server(proxy_that_answers(seen)) as url:
        no_proxy_env.setenv("HTTPS_PROXY", url)
        async with provider_client(max_connections=1, timeout_s=5) as client:
            with pytest.raises(httpx.ProxyError):
                await client.post("https://provider.invalid/v1/chat/completions", json={})
        calls = ProviderCalls(
            lambda c: OpenAIAdapter(c, "https://provider.invalid/v1", None), max_in_flight=1, timeout_s=5
        )
        async with calls.adapter() as adapter:
            with pytest.raises(ProviderUnavailable, match="connection failed"):
                await adapter.complete(request())
        await calls.aclose()
    assert seen[0][0] == b"CONNECT provider.invalid:443 HTTP/1.1"


async def test_no_proxy_star_turns_every_proxy_off(no_proxy_env: pytest.MonkeyPatch) -> None:
    async with raw_server(answer(OPENAI_OK)) as url:
        no_proxy_env.setenv("ALL_PROXY", free_port_url())  # nobody there: using it would fail the call
        no_proxy_env.setenv("NO_PROXY", "*")
        calls = ProviderCalls(lambda c: OpenAIAdapter(c, url + "/v1", None), max_in_flight=1, timeout_s=5)
        async with calls.adapter() as adapter:
            reply = await adapter.complete(request())
        await calls.aclose()
    assert reply.content == "hi"


def test_environment_proxies_become_httpx_mounts_by_httpx_rules(no_proxy_env: pytest.MonkeyPatch) -> None:
    no_proxy_env.setenv("HTTP_PROXY", "proxy.corp:3128")
    no_proxy_env.setenv("HTTPS_PROXY", "http://user:pw@proxy.corp:3129")
    no_proxy_env.setenv("NO_PROXY", "localhost, .internal,example.com,10.0.0.1,::1,http://plain.test")
    assert environment_proxy_mounts() == {
        "http://": "http://proxy.corp:3128",
        "https://": "http://user:pw@proxy.corp:3129",
        "all://localhost": None,
        "all://*.internal": None,
        "all://*example.com": None,
        "all://10.0.0.1": None,
        "all://[::1]": None,
        "http://plain.test": None,
    }
    no_proxy_env.setenv("NO_PROXY", "example.com,*")
    assert environment_proxy_mounts() == {}


async def test_connections_are_kept_alive_and_closed_before_the_server_would() -> None:
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await answer(OPENAI_OK)(reader, writer)

    assert KEEPALIVE_S < 5  # uvicorn's (vLLM's, the emulator's) idle timeout
    async with raw_server(serve) as url, provider_client(max_connections=4, timeout_s=5, keepalive_s=0.3) as client:
        for _ in range(3):
            (await client.send(json_request(client, url + "/v1/chat/completions", {}, {}, 5))).raise_for_status()
        assert connections == 1
        await asyncio.sleep(1.0)  # idle past keepalive_s: the client closed it, and opens another
        (await client.send(json_request(client, url + "/v1/chat/completions", {}, {}, 5))).raise_for_status()
        assert connections == 2


async def test_bodies_stream_both_ways() -> None:
    # A chunked reply is read whole by an adapter, or chunk by chunk through client.stream; a
    # request body given as an async iterator goes out chunked.
    bodies: list[bytes] = []
    release = asyncio.Event()
    half = len(OPENAI_OK) // 2

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            body = b""
            if b"transfer-encoding: chunked" in head.lower():
                while size := int((await reader.readline()).strip(), 16):
                    body += (await reader.readexactly(size + 2))[:-2]
                await reader.readexactly(2)
            else:
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                body = await reader.readexactly(length)
            bodies.append(body)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
            writer.write(f"{half:x}\r\n".encode() + OPENAI_OK[:half] + b"\r\n")
            await writer.drain()
            await release.wait()
            rest = OPENAI_OK[half:]
            writer.write(f"{len(rest):x}\r\n".encode() + rest + b"\r\n0\r\n\r\n")
            await writer.drain()

    async def parts() -> AsyncIterator[bytes]:
        yield b'{"model": '
        yield b'"m"}'

    async with raw_server(serve) as url, provider_client(max_connections=1, timeout_s=5) as client:
        async with client.stream("POST", url + "/v1/chat/completions", content=parts()) as response:
            chunks = response.aiter_bytes()
            first = await anext(chunks)  # here before the server sends the rest
            assert OPENAI_OK.startswith(first) and len(first) <= half
            release.set()
            whole = first + b"".join([chunk async for chunk in chunks])
        assert json.loads(whole)["choices"][0]["message"]["content"] == "hi"
        assert bodies == [b'{"model": "m"}']
        reply = await OpenAIAdapter(client, url + "/v1", None).complete(request())
    assert reply.content == "hi" and json.loads(bodies[1])["model"] == "m"


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (
            ValueError("Forbidden control character detected in headers. Potential header injection attack."),
            httpx.LocalProtocolError,
        ),
        (ValueError("some other bug"), ValueError),
        (aiohttp.ServerDisconnectedError(), httpx.RemoteProtocolError),
        (KeyError("bug"), KeyError),
    ],
)
def test_only_aiohttps_header_refusal_among_value_errors_is_mapped(
    raised: BaseException, expected: type[BaseException]
) -> None:
    """A bug's ValueError must not become a permanent provider error."""
    from farebox.patches.httpx_aiohttp_errors import map_aiohttp_errors

    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    with pytest.raises(expected) as caught, map_aiohttp_errors(request):
        raise raised
    assert type(caught.value) is expected
