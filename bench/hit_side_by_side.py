"""Cache hits and fresh jobs one at a time, side by side in one run: this checkout's stages, another checkout's
(``--against DIR``, e.g. a `git worktree` of an older commit) and one bare aio-pika hop, alternating run by run.
Prints a table and writes bench/results/hit_side_by_side.md.

    git worktree add /tmp/old <commit>
    .venv/bin/python bench/hit_side_by_side.py --against /tmp/old --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bare_chain import bare_chain, one_at_a_time
from common import check_imports, emulator_process, process_pipeline, publish_table, spread, wait_for_emulator

from farebox.client import FareboxClient
from farebox.patches import aiormq_writes

EMULATOR_PORT = 8095
ROOT = Path(__file__).resolve().parents[1]


async def farebox_side(emulator: str, checkout: Path, singles: int) -> tuple[float, float]:
    """p50 ms of fresh jobs and of cache hits, one at a time, with ``checkout``'s stage processes."""
    async with (
        process_pipeline(emulator, child_env={"PYTHONPATH": str(checkout)}) as (settings, _),
        FareboxClient.from_settings(settings, wait_for_pipeline_s=60) as client,
    ):
        await client.complete({"prompt": "warm up", "job_id": "warm"}, timeout=60)
        fresh, hits = [], []
        for i in range(singles):
            t = time.perf_counter()
            await client.complete({"prompt": f"single {settings.namespace} {i}", "max_tokens": 5}, timeout=60)
            fresh.append((time.perf_counter() - t) * 1000)
        for _ in range(singles):
            t = time.perf_counter()
            r = await client.complete({"prompt": "warm up"}, timeout=60)
            assert r.cache == "hit", r
            hits.append((time.perf_counter() - t) * 1000)
    return statistics.median(fresh), statistics.median(hits)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--against", type=Path, required=True, help="another checkout's root")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--singles", type=int, default=200)
    a = ap.parse_args()
    a.against = a.against.resolve()
    aiormq_writes.install()
    # From an empty folder: a child's working directory comes first on its sys.path (check_imports).
    os.chdir(tempfile.mkdtemp(prefix="fb-hit-sbs-"))
    print(f"against: stages from {check_imports(a.against)}", flush=True)
    rows: dict[str, list[float]] = {}
    body = json.dumps({"prompt": "bare"}).encode()
    with emulator_process(EMULATOR_PORT) as emulator:
        await wait_for_emulator()
        for _ in range(a.runs):  # alternating, so drift on this noisy machine hits every side alike
            async with bare_chain(n_hops=1) as ns:
                hop = statistics.median(await one_at_a_time(ns, a.singles, body))
            async with bare_chain() as ns:
                chain = statistics.median(await one_at_a_time(ns, a.singles, body))
            rows.setdefault("one bare hop + reply", []).append(hop)
            rows.setdefault("bare chain (4 hops + reply)", []).append(chain)
            for label, checkout in (("this checkout", ROOT), ("against", a.against)):
                fresh, hit = await farebox_side(emulator, checkout, a.singles)
                rows.setdefault(f"{label}: fresh job", []).append(fresh)
                rows.setdefault(f"{label}: cache hit", []).append(hit)
                rows.setdefault(f"{label}: **fresh / bare chain**", []).append(fresh / chain)
                rows.setdefault(f"{label}: **hit / one bare hop**", []).append(hit / hop)
    lines = [
        f"# One job at a time: this checkout vs {a.against} ({a.runs} alternating runs of {a.singles} jobs each)",
        "",
        "p50 ms (ratios run by run), median (min, max) over the runs:",
        "",
        "| measure | median (min, max) |",
        "|---|---|",
        *[f"| {name} | {spread(xs, '.2f')} |" for name, xs in rows.items()],
    ]
    publish_table("hit_side_by_side", "\n".join(lines) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
