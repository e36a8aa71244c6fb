"""What farebox saves on a realistic backfill: `make_workload.py --jobs 10000 --dup-rate 0.3` through
the pipeline under the shipped policy (routing + cache), and the same jobs pinned to the policy's
baseline model with the cache bypassed (every task on the expensive model, as the team in the
story ran it). Both through the real pipeline against the emulator, whose usage the prices are
applied to; several alternating runs. Prints a table and writes bench/results/cost.md.

    .venv/bin/python bench/cost.py --jobs 10000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from common import cores, emulator_process, make_workload, process_pipeline, publish_table, spread, wait_for_emulator

from farebox.client import FareboxClient
from farebox.routing.policy import load_policy
from farebox.settings import Settings

EMULATOR_PORT = 8094


@dataclass
class Totals:
    cost_usd: float
    baseline_usd: float  # what farebox itself says the same usage would have cost on the baseline model
    jobs: int
    ok: int
    cache: Counter[str]
    models: Counter[str]
    kept: list[float]  # per job the learned router decided: the share of premium quality its level keeps


# The route reason of a job the learned router decided names its level (farebox/routing/tiering.py).
KEEPS = re.compile(r"^learned router score .*? keeps ([\d.]+)% of premium quality")


async def through_farebox(emulator: str, jobs: list[dict[str, Any]]) -> Totals:
    async with (
        process_pipeline(emulator) as (settings, _),
        FareboxClient.from_settings(settings, wait_for_pipeline_s=60, coalesce_writes=True) as client,
    ):
        t = Totals(0.0, 0.0, 0, 0, Counter(), Counter(), [])
        async for r in client.stream(
            [dict(j, job_id=f"{settings.namespace}-{i}") for i, j in enumerate(jobs)], max_in_flight=256
        ):
            t.jobs += 1
            t.ok += r.status == "ok"
            t.cost_usd += r.cost_usd
            t.baseline_usd += r.baseline_cost_usd
            t.cache[r.cache] += 1
            t.models[f"{r.provider}/{r.model}"] += 1
            match = KEEPS.match(r.route.reason) if r.route is not None else None
            if match:
                t.kept.append(float(match.group(1)))
        return t


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--dup-rate", type=float, default=0.3)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    jobs, shape = make_workload(a.jobs, a.dup_rate, seed=1)
    baseline_model = load_policy(Settings().policy).baseline_model
    pinned = [dict(j, model=baseline_model, cache={"mode": "bypass"}) for j in jobs]
    routed: list[Totals] = []
    naive: list[Totals] = []
    with emulator_process(EMULATOR_PORT) as emulator:
        await wait_for_emulator()
        for _ in range(a.runs):
            routed.append(await through_farebox(emulator, jobs))
            naive.append(await through_farebox(emulator, pinned))
    savings = [100 * (1 - r.cost_usd / n.cost_usd) for r, n in zip(routed, naive, strict=True)]
    hits = [100 * (r.cache["hit"] + r.cache["coalesced"]) / r.jobs for r in routed]
    top = routed[-1].models.most_common(6)
    publish_table(
        "cost",
        "\n".join(
            [
                f"# Cost of make_workload.py --jobs {a.jobs} --dup-rate {a.dup_rate} ({cores()} cores, {a.runs} runs; "
                f"{shape['unique_keys']} unique requests, {shape['repeats']} exact repeats)",
                "",
                "| measure | farebox (policy routing + cache) | all on the baseline, no cache |",
                "|---|---|---|",
                f"| total cost USD | {spread([r.cost_usd for r in routed], '.4f')} | "
                f"{spread([n.cost_usd for n in naive], '.4f')} |",
                f"| cost per job USD | {spread([r.cost_usd / r.jobs for r in routed], '.6f')} | "
                f"{spread([n.cost_usd / n.jobs for n in naive], '.6f')} |",
                f"| ok results | {spread([r.ok for r in routed], '.0f')} | {spread([n.ok for n in naive], '.0f')} |",
                f"| cache hits + coalesced, % of jobs | {spread(hits, '.1f')} | 0 (bypassed) |",
                f"| savings vs the baseline run, % | {spread(savings, '.1f')} | - |",
                f"| quality kept, % of premium (the learned router's calibrated level, mean over the jobs it "
                f"decided) | {spread([sum(r.kept) / len(r.kept) if r.kept else 100.0 for r in routed], '.1f')} "
                "| 100 (all premium) |",
                f"| jobs the learned router decided | {spread([len(r.kept) for r in routed], '.0f')} | - |",
                f"| farebox's own baseline figure USD (same usage priced on {baseline_model}) | "
                f"{spread([r.baseline_usd for r in routed], '.4f')} | - |",
                "",
                f"Baseline model: {baseline_model} (catalog/policy.json). Where farebox sent the jobs (last run): "
                + ", ".join(f"{m} {c}" for m, c in top)
                + ".",
                "",
            ]
        ),
    )


if __name__ == "__main__":
    asyncio.run(main())
