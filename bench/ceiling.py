"""farebox against its ceiling, side by side in one run: the bare aio-pika chain (bench/bare_chain.py,
same hops and durability, no work) and the farebox pipeline (one process per stage, emulator at
0 ms), at 0% and 30% repeats, several alternating runs. Prints a table and writes
bench/results/ceiling.md.

    .venv/bin/python bench/ceiling.py --jobs 3000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from bare_chain import bare_chain, drive, one_at_a_time
from common import (
    CpuGroups,
    broker_pids,
    cores,
    emulator_process,
    make_workload,
    percentile,
    pids_of,
    process_pipeline,
    publish_table,
    redis_pids,
    spread,
    wait_for_emulator,
)

from farebox.client import FareboxClient
from farebox.patches import aiormq_writes

EMULATOR_PORT = 8099
CPU: dict[tuple[str, str], list[float]] = {}  # (side, process group) -> CPU ms per job, one per run
RAW_HITS: list[list[float]] = []  # farebox cache hits timed with the bare chain's client, one list per run


async def farebox_rate(
    emulator: str, jobs: list[dict[str, object]], singles: int, in_flight: int, cpu_side: str | None = None
) -> tuple[float, list[float], list[float]]:
    """jobs/s, then one-at-a-time latencies of fresh jobs and of cache hits."""
    async with (
        process_pipeline(emulator) as (settings, procs),
        FareboxClient.from_settings(settings, wait_for_pipeline_s=60) as client,
    ):
        run = settings.namespace
        await client.complete({"prompt": "warm up", "job_id": f"warm-{run}"}, timeout=60)
        tagged = [dict(j, job_id=f"{run}-{i}") for i, j in enumerate(jobs)]
        meter = CpuGroups(
            {
                "stage processes": [p.pid for p in procs.procs.values()],
                "broker": broker_pids(),
                "emulator": pids_of(f"emulator --port {EMULATOR_PORT}"),
                "redis": redis_pids(),
            }
        )
        t0 = time.perf_counter()
        n = 0
        async for _ in client.stream(tagged, max_in_flight=in_flight):
            n += 1
        rate = n / (time.perf_counter() - t0)
        if cpu_side:
            for group, ms in meter.per_job_ms(n).items():
                CPU.setdefault((cpu_side, group), []).append(ms)
        fresh = [
            await timed(client, {"prompt": f"single {run} {i}", "task": "classify", "max_tokens": 5})
            for i in range(singles)
        ]
        hits = [await timed(client, {"prompt": "warm up"}, cache="hit") for _ in range(singles)]
        if singles:  # the same hits through the bare chain's own client: the client's share left out
            raw = json.dumps({"prompt": "warm up"}).encode()
            RAW_HITS.append(sorted(await one_at_a_time(run, singles, raw, target=settings.topology.intake)))
    return rate, sorted(fresh), sorted(hits)


async def timed(client: FareboxClient, job: dict[str, object], cache: str | None = None) -> float:
    t = time.perf_counter()
    r = await client.complete(job, timeout=60)
    if r.status != "ok" or (cache and r.cache != cache):
        raise SystemExit(f"unexpected result while timing: status {r.status}, cache {r.cache}, {r.error}")
    return (time.perf_counter() - t) * 1000


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--singles", type=int, default=200)
    ap.add_argument(
        "--in-flight",
        type=int,
        nargs="+",
        default=[64, 1000],
        help="unanswered jobs the producer allows (both sides); one set of rows per value",
    )
    a = ap.parse_args()
    # Process-wide, so the same in every run (farebox's client here included), as its stages and CLI do; the stock
    # driver's aio-pika publishes (one per turn under aiormq's channel lock) write as before.
    aiormq_writes.install()
    fresh, repeats = make_workload(a.jobs, 0, seed=1)[0], make_workload(a.jobs, 0.3, seed=2)[0]
    body = json.dumps(fresh[0]).encode()
    rates: dict[tuple[str, int], list[float]] = {}
    lat: dict[str, list[float]] = {}
    with emulator_process(EMULATOR_PORT) as emulator:
        await wait_for_emulator()
        for _ in range(a.runs):  # alternate, so drift on this noisy machine hits both alike
            for k, in_flight in enumerate(a.in_flight):
                singles = a.singles if k == 0 else 0
                measured = in_flight == a.in_flight[-1]  # CPU per job is reported for the last setting
                async with bare_chain() as ns:
                    meter = CpuGroups({"stage processes": pids_of(f"bare_chain.py hop {ns} "), "broker": broker_pids()})
                    rates.setdefault(("bare", in_flight), []).append(
                        await drive(ns, a.jobs, max_in_flight=in_flight, body=body)
                    )
                    if measured:
                        for group, ms in meter.per_job_ms(a.jobs).items():
                            CPU.setdefault(("bare", group), []).append(ms)
                    if singles:
                        note(lat, "bare", await one_at_a_time(ns, singles, body))
                async with bare_chain(coalesced=True) as ns:
                    meter = CpuGroups({"stage processes": pids_of(f"bare_chain.py hop {ns} "), "broker": broker_pids()})
                    rates.setdefault(("bare_cw", in_flight), []).append(
                        await drive(ns, a.jobs, max_in_flight=in_flight, body=body, coalesced=True)
                    )
                    if measured:
                        for group, ms in meter.per_job_ms(a.jobs).items():
                            CPU.setdefault(("bare_cw", group), []).append(ms)
                if singles:
                    async with bare_chain(n_hops=1) as ns:
                        note(lat, "bare1", await one_at_a_time(ns, singles, body))
                rate, fresh_lat, hit_lat = await farebox_rate(
                    emulator, fresh, singles, in_flight, "farebox" if measured else None
                )
                rates.setdefault(("fb0", in_flight), []).append(rate)
                if singles:
                    note(lat, "fb", fresh_lat)
                    note(lat, "hit", hit_lat)
                    note(lat, "rawhit", RAW_HITS[-1])
                rates.setdefault(("fb30", in_flight), []).append(
                    (await farebox_rate(emulator, repeats, 0, in_flight))[0]
                )
    rows = []
    for in_flight in a.in_flight:
        bare = rates[("bare", in_flight)]
        fb0, fb30 = rates[("fb0", in_flight)], rates[("fb30", in_flight)]
        rows += [
            f"| {in_flight} in flight: bare chain jobs/s | {spread(bare, '.0f')} |",
            f"| {in_flight} in flight: farebox jobs/s, 0% repeats | {spread(fb0, '.0f')} |",
            f"| {in_flight} in flight: farebox jobs/s, 30% repeats | {spread(fb30, '.0f')} |",
            f"| {in_flight} in flight: **ratio farebox/bare, 0% repeats** | {spread(ratios(fb0, bare), '.2f')} |",
            f"| {in_flight} in flight: ratio farebox/bare, 30% repeats | {spread(ratios(fb30, bare), '.2f')} |",
            f"| {in_flight} in flight: bare chain jobs/s, with farebox's AMQP write path | "
            f"{spread(rates[('bare_cw', in_flight)], '.0f')} |",
            f"| {in_flight} in flight: ratio farebox/bare with farebox's write path, 0% repeats | "
            f"{spread(ratios(fb0, rates[('bare_cw', in_flight)]), '.2f')} |",
        ]
    publish_table(
        "ceiling",
        "\n".join(
            [
                f"# farebox vs the bare aio-pika chain ({cores()} cores, {a.runs} alternating runs, {a.jobs} jobs)",
                "",
                "| measure | median (min, max) |",
                "|---|---|",
                *rows,
                *[
                    f"| one at a time {q} ms, {label} | {spread(lat[key + q], '.1f')} |"
                    for key, label in (
                        ("bare", "bare chain (4 hops + reply)"),
                        ("fb", "farebox (fresh job, emulator at 0 ms)"),
                        ("bare1", "one bare hop + reply"),
                        ("hit", "farebox cache hit (intake -> dedup -> reply)"),
                        ("rawhit", "farebox cache hit, timed with the bare chain's client"),
                    )
                    for q in ("p50", "p99")
                ],
                *[
                    f"| **ratio {label}, p50** | {spread(ratios(lat[a + 'p50'], lat[b + 'p50']), '.2f')} |"
                    for a, b, label in (
                        ("fb", "bare", "fresh job / bare chain"),
                        ("hit", "bare1", "cache hit / one bare hop"),
                        ("rawhit", "bare1", "cache hit with the bare client / one bare hop"),
                    )
                ],
                "",
                "Ratios are taken run by run (each farebox run against the bare run just before it).",
                "",
                *cpu_table(a.in_flight[-1]),
                "",
            ]
        ),
    )


def cpu_table(in_flight: int) -> list[str]:
    """Where the CPU goes, per job, on both sides: the two cores are the limit on both."""
    groups = ("stage processes", "broker", "emulator", "redis")
    bare_total = [sum(xs) for xs in zip(*(CPU[("bare", g)] for g in groups[:2]), strict=True)]
    cw_total = [sum(xs) for xs in zip(*(CPU[("bare_cw", g)] for g in groups[:2]), strict=True)]
    fare_total = [sum(xs) for xs in zip(*(CPU[("farebox", g)] for g in groups), strict=True)]

    def cell(side: str, group: str) -> str:
        return spread(CPU[(side, group)], ".2f") if (side, group) in CPU else "-"

    rows = [f"| {g} | {cell('bare', g)} | {cell('bare_cw', g)} | {cell('farebox', g)} |" for g in groups]
    # The provider's side of each call (the emulator) is work the bare chain does not do.
    without_provider = [f - CPU[("farebox", "emulator")][i] for i, f in enumerate(fare_total)]
    return [
        f"CPU ms per job at {in_flight} in flight, by process group (the bare chain's stage processes are its "
        "4 hops; no side's producer is counted):",
        "",
        "| process group | bare chain | bare chain, farebox's write path | farebox |",
        "|---|---|---|---|",
        *rows,
        f"| total | {spread(bare_total, '.2f')} | {spread(cw_total, '.2f')} | {spread(fare_total, '.2f')} |",
        f"| total without the emulator | {spread(bare_total, '.2f')} | {spread(cw_total, '.2f')} | "
        f"{spread(without_provider, '.2f')} |",
        "",
        "farebox's broker costs less per job than the bare chain's because its internal hops carry batches; "
        "its stages cost more because each job is decoded, routed, priced, sent to a provider over HTTP "
        "and recorded in Redis.",
    ]


def note(lat: dict[str, list[float]], key: str, sample: list[float]) -> None:
    ordered = sorted(sample)
    lat.setdefault(key + "p50", []).append(statistics.median(ordered))
    lat.setdefault(key + "p99", []).append(percentile(ordered, 0.99))


def ratios(xs: list[float], base: list[float]) -> list[float]:
    return [x / b for x, b in zip(xs, base, strict=True)]


if __name__ == "__main__":
    asyncio.run(main())
