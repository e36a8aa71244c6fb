"""Provider faults through the emulator's knobs, end to end: completion, retries and fallbacks
per job, and the slowest job. Prints a table and writes bench/results/provider_faults.md.

    .venv/bin/python bench/provider_faults.py --jobs 2000
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from common import cores, publish_table

from farebox.emulator.knobs import EmulatorKnobs
from farebox.settings import Settings
from tests.support.pipeline import drop_redis_prefix
from tests.test_provider_faults import FAULTY, jobs, run_jobs

SCENARIOS = {
    f"{FAULTY}: 20% 5xx, 10% 429, 5% timeouts": dict(
        fail_rate=0.2, rate_limit_rate=0.1, timeout_rate=0.05, faulty=FAULTY, retry_after_s=0.1, seed=5
    ),
    f"{FAULTY} fully down": dict(fail_rate=1.0, faulty=FAULTY),
    "every provider down (deadline 30 s)": dict(fail_rate=1.0),
}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2000)
    a = ap.parse_args()
    rows = []
    for name, knobs in SCENARIOS.items():
        run = uuid.uuid4().hex[:8]
        settings = Settings(namespace=f"fbbench-{run}", redis_prefix=f"fbbench:{run}:", metrics_port=0)
        n = a.jobs if "every" not in name else min(a.jobs, 500)
        extra = {"deadline_s": 30.0} if "every" in name else {}
        t0 = time.perf_counter()
        results = await run_jobs(settings, EmulatorKnobs(port=0, **knobs), jobs(n, **extra))  # type: ignore[arg-type]
        elapsed = time.perf_counter() - t0
        await drop_redis_prefix(settings)
        ok = sum(r.status == "ok" for r in results)
        codes = sorted({r.error.code for r in results if r.error})
        rows.append(
            f"| {name} | {n} | {len(results)} | {ok} | {', '.join(codes) or '-'} | "
            f"{sum(r.retries for r in results) / n:.2f} | "
            f"{sum(1 for r in results if r.route and r.route.fallbacks)} | "
            f"{max((r.latency_ms or 0) for r in results) / 1000:.1f} | {elapsed:.0f} |"
        )
    title = f"# Provider faults ({cores()} cores, in-process pipeline, provider timeout 1 s)"
    publish_table(
        "provider_faults",
        "\n".join(
            [
                title,
                "",
                "| scenario | jobs | results | ok | error codes | retries/job | fell back | slowest job s | run s |",
                "|---|---|---|---|---|---|---|---|---|",
                *rows,
                "",
            ]
        ),
    )


if __name__ == "__main__":
    asyncio.run(main())
