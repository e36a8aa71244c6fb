"""Jobs/s through the whole pipeline (one OS process per stage) on the machine's single RabbitMQ node
(FAREBOX_AMQP_URL, else 127.0.0.1:5672) and on a 3-node cluster started here (tests/support/rabbit_cluster.py,
every node on this machine, the stages spread over the nodes), side by side in one run: the runs alternate, so
both see the same machine. Prints a table and writes bench/results/rabbit_cluster.md.

    .venv/bin/python bench/rabbit_cluster.py --jobs 2000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from common import cores, emulator_process, make_workload, process_pipeline, publish_table, spread, wait_for_emulator

from farebox.client import FareboxClient
from tests.support.rabbit_cluster import rabbit_cluster

PORT = 8099
SINGLE = os.environ.get("FAREBOX_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


async def one_run(emulator: str, amqp_url: str, jobs: list[dict[str, object]]) -> float:
    async with (
        process_pipeline(emulator, amqp_url=amqp_url) as (settings, _),
        FareboxClient.from_settings(settings, wait_for_pipeline_s=60, coalesce_writes=True) as client,
    ):
        run = settings.namespace
        await client.complete({"prompt": "warm up", "job_id": f"warm-{run}"}, timeout=60)
        tagged = [dict(j, job_id=f"{run}-{i}") for i, j in enumerate(jobs)]
        t0 = time.perf_counter()
        n = 0
        async for _ in client.stream(tagged, max_in_flight=1000):
            n += 1
        return n / (time.perf_counter() - t0)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    jobs, _ = make_workload(a.jobs, 0, seed=1)
    rates: dict[str, list[float]] = {"single": [], "cluster": []}
    with emulator_process(PORT) as emulator, rabbit_cluster(3) as cluster:
        await wait_for_emulator()
        targets = {"single": SINGLE, "cluster": ",".join(cluster.urls)}
        for _ in range(a.runs):
            for name, url in targets.items():
                rates[name].append(await one_run(emulator, url, jobs))
                print(f"{name}: {rates[name][-1]:.0f} jobs/s", flush=True)
    ratio = [c / s for c, s in zip(rates["cluster"], rates["single"], strict=True)]
    publish_table(
        "rabbit_cluster",
        "\n".join(
            [
                f"# Pipeline jobs/s: one RabbitMQ node vs a 3-node cluster ({cores()} cores, {a.runs} runs each, "
                "alternating; emulator at 0 ms)",
                "",
                "Every node of the cluster runs on this machine beside the stages, so it measures what the replication",
                "costs in CPU and round trips, not what more machines would give.",
                "",
                "| broker | jobs/s, median (min, max) |",
                "|---|---|",
                f"| single node (127.0.0.1:5672) | {spread(rates['single'], '.0f')} |",
                f"| 3-node cluster, quorum queues on all 3, stages spread over the nodes | "
                f"{spread(rates['cluster'], '.0f')} |",
                f"| cluster / single, per run pair | {spread(ratio, '.2f')} |",
                "",
                f"{a.jobs} jobs from make_workload --dup-rate 0 per run.",
                "",
            ]
        ),
    )


if __name__ == "__main__":
    asyncio.run(main())
