"""Issue 6's acceptance: after make_workload's jobs with 30% repeats, `farebox report` totals equal
the sum of per-job cost_usd in the results, and llm_proxy_cost_total summed over processes. The
default run sends 1,000 jobs; the 5,000 of the acceptance run is marked slow."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from farebox.settings import Settings
from tests.support.pipeline import (
    ALL_STAGES,
    InProcessPipeline,
    ProcessPipeline,
    drop_namespace,
    report_json,
)
from tests.support.ports import port_is_free
from tests.support.workload import make_workload


def free_port_block(n: int) -> int:
    """A first port with n free ports after it, below Linux's ephemeral range (32768+) so that no
    outgoing connection of the workers can take one between this check and their bind."""
    for _ in range(200):
        base = random.randrange(20000, 32000 - n)
        if all(port_is_free(base + i, "0.0.0.0") for i in range(n)):
            return base
    raise RuntimeError("no free port block")


def scrape_cost(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "llm_proxy_cost"
        for sample in family.samples
        if sample.name == "llm_proxy_cost_total"
    )


@pytest.mark.parametrize("n_jobs", [300, pytest.param(5000, marks=pytest.mark.slow)])
async def test_report_equals_results_and_metrics(settings: Settings, redis: Redis, emulator: str, n_jobs: int) -> None:
    jobs, summary = make_workload(n_jobs, 0.3, seed=11)
    s = settings.model_copy(update={"emulator_url": emulator, "metrics_port": free_port_block(len(ALL_STAGES))})
    procs = ProcessPipeline(s)
    procs.start()
    try:
        async with InProcessPipeline(s).client(wait_for_pipeline_s=60) as client:
            results = [r async for r in client.stream(jobs, max_in_flight=300)]
        metric_total = sum([await asyncio.to_thread(scrape_cost, procs.metrics_port(spec)) for spec in ALL_STAGES])
    finally:
        procs.terminate()
        await drop_namespace(s)
    assert len(results) == summary["jobs"]
    total = (await report_json(s, "--by", "tenant,model"))["total"]
    from_results = sum(r.cost_usd for r in results)
    assert total["jobs"] == len(results)
    assert round(total["cost_usd"], 2) == round(from_results, 2)
    assert abs(total["cost_usd"] - from_results) < 1e-6
    assert abs(metric_total - from_results) < 1e-6
    assert total["cache_hits"] == sum(1 for r in results if r.cache != "miss") == summary["repeats"]
    assert abs(total["savings_usd"] - sum(r.baseline_cost_usd - r.cost_usd for r in results)) < 1e-6


def test_a_remembered_metric_child_is_the_labelled_child() -> None:
    from farebox import metrics

    child = metrics.child(metrics.COST, "model-x", "provider-y")
    assert child is metrics.COST.labels("model-x", "provider-y")
    assert metrics.child(metrics.COST, "model-x", "provider-y") is child
    before = child._value.get()
    child.inc(0.5)
    assert metrics.COST.labels("model-x", "provider-y")._value.get() == before + 0.5
