"""The per-slot client pool: slots are reused, capped, and a client whose call was cancelled is
replaced (httpcore can keep a dead slot after a cancellation; with one connection per client
that client would otherwise hang every later call)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from farebox.errors import ProviderUnavailable
from workers.providers.pool import AdapterPool


class FakeAdapter:
    name = "fake"

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def complete(self, request: object) -> object:
        raise NotImplementedError


async def test_slots_are_reused_and_capped() -> None:
    pool = AdapterPool(FakeAdapter, size=2, timeout_s=1)  # type: ignore[arg-type]
    async with pool.adapter() as a1, pool.adapter() as a2:
        assert a1 is not a2
        third = asyncio.create_task(_take(pool))
        await asyncio.sleep(0.05)
        assert not third.done()  # capped at two
    got = await asyncio.wait_for(third, 1)
    assert got in (a1, a2)
    await pool.aclose()


async def test_provider_error_keeps_the_client_and_cancellation_replaces_it() -> None:
    pool = AdapterPool(FakeAdapter, size=1, timeout_s=1)  # type: ignore[arg-type]
    with pytest.raises(ProviderUnavailable):
        async with pool.adapter() as first:
            raise ProviderUnavailable("503")
    async with pool.adapter() as again:
        assert again is first
    task = asyncio.create_task(_hold(pool))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with pool.adapter() as fresh:
        assert fresh is not first and fresh.client is not first.client  # type: ignore[attr-defined]
    await pool.aclose()


async def _take(pool: AdapterPool) -> object:
    async with pool.adapter() as a:
        return a


async def _hold(pool: AdapterPool) -> None:
    async with pool.adapter():
        await asyncio.sleep(10)


async def test_clients_share_one_ssl_context(monkeypatch: pytest.MonkeyPatch) -> None:
    # Building an SSL context loads the CA bundle (~30 ms of CPU); one per slot was a quarter of
    # the execute stage's CPU in a profile. The pool builds it once and every client gets it.
    built: list[object] = []
    real = httpx.create_ssl_context

    def counting(*args: object, **kwargs: object) -> object:
        built.append(real(*args, **kwargs))  # type: ignore[arg-type]
        return built[-1]

    monkeypatch.setattr(httpx, "create_ssl_context", counting)
    pool = AdapterPool(FakeAdapter, size=3, timeout_s=1)  # type: ignore[arg-type]
    async with pool.adapter() as a1, pool.adapter() as a2, pool.adapter() as a3:
        clients = [a.client for a in (a1, a2, a3)]  # type: ignore[attr-defined]
        assert len({id(c) for c in clients}) == 3
    assert len(built) == 1
    # ... and every client's connection pool really uses it (httpx 0.28 internals)
    assert all(c._transport._pool._ssl_context is built[0] for c in clients)
    await pool.aclose()
