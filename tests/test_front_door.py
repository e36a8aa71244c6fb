"""Small things a new user meets: where metrics listen, how costs print, spend by tenant."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from farebox import metrics
from farebox.routing.catalog import load_catalog
from farebox.routing.policy import load_policy
from farebox.schemas import Envelope, Job, Outcome, RouteDecision, Usage
from farebox.settings import CATALOG_DIR, Settings
from farebox.stages.results import build_result
from tests.support.pipeline import InProcessPipeline


def test_metrics_listen_on_loopback_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAREBOX_METRICS_HOST", raising=False)
    assert Settings().metrics_host == "127.0.0.1"
    monkeypatch.setenv("FAREBOX_METRICS_HOST", "0.0.0.0")
    assert Settings().metrics_host == "0.0.0.0"


def test_serve_metrics_binds_the_host_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    bound: list[tuple[int, str]] = []
    monkeypatch.setattr(metrics, "start_http_server", lambda port, addr: bound.append((port, addr)))
    assert metrics.serve_metrics(9999, "127.0.0.1") == 9999
    assert metrics.serve_metrics(0, "0.0.0.0") == 0
    assert bound == [(9999, "127.0.0.1")]


def test_the_worker_serves_metrics_on_the_configured_host(monkeypatch: pytest.MonkeyPatch) -> None:
    from farebox.stages import main

    bound: list[tuple[int, str]] = []
    monkeypatch.setattr(main.metrics, "serve_metrics", lambda port, host: bound.append((port, host)) or port)
    monkeypatch.setattr(main.uvloop, "run", lambda coro: coro.close())
    main.worker_main(Settings(metrics_port=9465, metrics_host="10.1.2.3"), "route", None)
    assert bound == [(9465, "10.1.2.3")]


def envelope_with_usage(input_tokens: int, output_tokens: int) -> Envelope:
    job = Job.model_validate({"tenant": "acme", "prompt": "hi"})
    route = RouteDecision(provider="openai", model="gpt-4o-mini", reason="test", candidates=("openai/gpt-4o-mini",))
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    outcome = Outcome(content="ok", provider="openai", model="gpt-4o-mini", usage=usage)
    return Envelope(job_id="j1", job=job, received_at=time.time(), route=route, outcome=outcome)


@pytest.mark.parametrize(("input_tokens", "output_tokens"), [(7, 3), (1, 1), (333, 777), (10_001, 29)])
def test_result_costs_carry_no_float_noise(input_tokens: int, output_tokens: int) -> None:
    catalog = load_catalog(CATALOG_DIR / "model_costs.json")
    policy = load_policy(CATALOG_DIR / "policy.json")
    result = build_result(envelope_with_usage(input_tokens, output_tokens), catalog, policy, now=time.time())
    for cost in (result.cost_usd, result.baseline_cost_usd):
        assert cost == round(cost, 9)
        assert len(repr(cost).split(".")[-1]) <= 9, repr(cost)


def tenant_cost(tenant: str) -> float:
    value: Any = REGISTRY.get_sample_value("farebox_tenant_cost_usd_total", {"tenant": tenant})
    return float(value or 0.0)


async def test_spend_is_counted_by_tenant_for_the_tenants_the_policy_names(
    settings: Settings, emulator: str, tmp_path: Path
) -> None:
    data = json.loads((CATALOG_DIR / "policy.json").read_text())
    data.setdefault("tenants", {})["tenant-a"] = {}  # named; tenant-b is not, so it counts under "other"
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(data))
    pipeline = InProcessPipeline(settings.model_copy(update={"emulator_url": emulator, "policy": policy}))
    await pipeline.start()
    before = {t: tenant_cost(t) for t in ("tenant-a", "tenant-b", metrics.OTHER_TENANT)}
    try:
        async with pipeline.client() as client:
            a = await client.complete({"tenant": "tenant-a", "prompt": "Summarize: the tenant metric"}, timeout=30)
            b = await client.complete({"tenant": "tenant-b", "prompt": "Classify: the tenant metric"}, timeout=30)
    finally:
        await pipeline.close()
    assert a.status == b.status == "ok" and a.cost_usd > 0 and b.cost_usd > 0
    assert tenant_cost("tenant-a") - before["tenant-a"] == pytest.approx(a.cost_usd)
    assert tenant_cost(metrics.OTHER_TENANT) - before[metrics.OTHER_TENANT] == pytest.approx(b.cost_usd)
    assert tenant_cost("tenant-b") == before["tenant-b"] == 0.0


def test_a_bad_setting_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from farebox.cli import main

    monkeypatch.setenv("FAREBOX_PREFETCH", "lots")
    assert main(["report"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("farebox: invalid FAREBOX_* setting:") and "prefetch" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [("route=2", ("route", 2)), ("execute=10", ("execute", 10)), ("x=y", None), ("route=0", None), ("route", None)],
)
def test_scale_takes_a_stage_and_a_count(text: str, expected: tuple[str, int] | None) -> None:
    import argparse

    from farebox.cli.pipeline import scale_arg

    if expected is None:
        with pytest.raises(argparse.ArgumentTypeError):
            scale_arg(text)
    else:
        assert scale_arg(text) == expected
