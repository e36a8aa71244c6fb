"""CPU per provider call of the HTTP client set-ups the execute stage could use, against the emulator
over loopback with many calls in flight, alternating runs. Prints a table and writes
bench/results/http_client.md.

    .venv/bin/python bench/http_client.py --calls 4000 --in-flight 256 --runs 3

* httpx, one client: one httpx.AsyncClient with a connection per call in flight;
* httpx, a client per slot: what farebox/providers/pool.py did before the aiohttp transport;
* httpx on aiohttp: what the execute stage uses now (farebox/patches/httpx_transport.py);
* aiohttp alone: the floor, without httpx's request and response objects.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import httpx
import uvloop
from common import cores, cpu_s, emulator_process, pids_of, publish_table, spread, wait_for_emulator

from farebox.patches.httpx_transport import AiohttpTransport
from farebox.providers.base import json_request

PORT = 8096
PATH = "/google/v1beta/models/gemini-2.0-flash:generateContent"
BODY = {
    "contents": [{"role": "user", "parts": [{"text": "Summarize this short text for me, please. " * 5}]}],
    "generationConfig": {"maxOutputTokens": 20},
}
HEADERS = {"x-goog-api-key": "k"}
Call = Callable[[], Awaitable[object]]


async def setups(url: str, in_flight: int) -> dict[str, tuple[Call, Callable[[], Awaitable[None]]]]:
    import aiohttp

    one = httpx.AsyncClient(limits=httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight))
    free: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
    per_slot = [
        httpx.AsyncClient(limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)) for _ in range(in_flight)
    ]
    for c in per_slot:
        free.put_nowait(c)
    on_aiohttp = httpx.AsyncClient(transport=AiohttpTransport(max_connections=in_flight))
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight))

    async def via(client: httpx.AsyncClient) -> object:
        # As the adapters send (farebox/providers/base.py post_json).
        response = await client.send(json_request(client, url + PATH, HEADERS, BODY, 30))
        return response.json()

    async def slot() -> object:
        client = await free.get()
        try:
            return await via(client)
        finally:
            free.put_nowait(client)

    async def bare() -> object:
        async with session.post(url + PATH, headers=HEADERS, json=BODY) as response:
            return await response.json()

    async def close_slots() -> None:
        for c in per_slot:
            await c.aclose()

    return {
        "httpx, one client": (lambda: via(one), one.aclose),
        "httpx, a client per slot (before)": (slot, close_slots),
        "httpx on aiohttp (now)": (lambda: via(on_aiohttp), on_aiohttp.aclose),
        "aiohttp alone": (bare, session.close),
    }


async def measure(call: Call, calls: int, in_flight: int, emulator_pids: list[int]) -> tuple[float, float, float]:
    """Client CPU ms per call, emulator CPU ms per call, calls/s."""
    gate = asyncio.Semaphore(in_flight)

    async def one() -> None:
        async with gate:
            await call()

    await asyncio.gather(*(one() for _ in range(in_flight)))  # connections open before timing
    emu0, cpu0, t0 = sum(cpu_s(p) for p in emulator_pids), time.process_time(), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(calls)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    emu = sum(cpu_s(p) for p in emulator_pids) - emu0
    return 1000 * cpu / calls, 1000 * emu / calls, calls / wall


async def main(args: argparse.Namespace) -> None:
    with emulator_process(PORT) as url:
        await wait_for_emulator()
        emulator_pids = pids_of(f"emulator --port {PORT}")
        chosen = await setups(url, args.in_flight)
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in chosen}
        for _ in range(args.runs):
            for name, (call, _) in chosen.items():
                results[name].append(await measure(call, args.calls, args.in_flight, emulator_pids))
        for _, close in chosen.values():
            await close()
    now = results["httpx on aiohttp (now)"]
    lines = [
        f"# HTTP client CPU per provider call ({cores()} cores, {args.runs} alternating runs, "
        f"{args.calls} calls, {args.in_flight} in flight, emulator at 0 ms)",
        "",
        "| client | client CPU ms/call | emulator CPU ms/call | calls/s | CPU vs now |",
        "|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        ratio = [r[0] / n[0] for r, n in zip(runs, now, strict=True)]
        lines.append(
            f"| {name} | {spread([r[0] for r in runs], '.3f')} | {spread([r[1] for r in runs], '.3f')} | "
            f"{spread([r[2] for r in runs], '.0f')} | {statistics.median(ratio):.2f}x |"
        )
    lines += ["", "Client CPU is the benchmark process's own; the emulator runs in its own process on the same cores."]
    publish_table("http_client", "\n".join(lines) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=4000)
    ap.add_argument("--in-flight", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    uvloop.run(main(ap.parse_args()))
