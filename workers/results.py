"""Pure construction of the caller's result from a finished envelope."""

from __future__ import annotations

from farebox.routing.catalog import Catalog, cost_usd
from farebox.routing.policy import Policy
from farebox.routing.tasks import baseline_cost_usd
from farebox.schemas import Envelope, ErrorInfo, JobResult, RouteInfo, Usage


def build_result(env: Envelope, catalog: Catalog, policy: Policy, *, now: float) -> JobResult:
    route = None
    if env.route is not None:
        route = RouteInfo(
            reason=env.route.reason,
            candidates=env.route.candidates,
            fallbacks=env.fallbacks,
            strategy=env.route.strategy,
        )
    common = {
        "job_id": env.job_id,
        "tenant": env.job.tenant,
        "metadata": env.job.metadata,
        "route": route,
        "latency_ms": round(max(0.0, now - env.received_at) * 1000, 3),
    }
    if env.error is not None or env.outcome is None:
        error = env.error or ErrorInfo(code="internal", message="the job finished without an answer")
        target = env.route
        return JobResult(
            status="error",
            error=error,
            cache=env.cache_status,
            retries=env.retries,
            provider=target.provider if target else None,
            model=target.model if target else None,
            **common,
        )
    out = env.outcome
    usage: Usage = out.usage
    baseline = baseline_cost_usd(policy, catalog, usage)
    if env.cache_status == "miss":
        info = catalog.get(f"{out.provider}/{out.model}")
        cost = cost_usd(info, usage) if info is not None else 0.0
    else:
        cost = 0.0  # a hit or a coalesced duplicate costs nothing; its baseline shows the saving
    return JobResult(
        status="ok",
        content=out.content,
        provider=out.provider,
        model=out.model,
        usage=usage,
        # To the ledger's nano-dollar precision: no float noise such as 0.0019999999999999996.
        cost_usd=round(cost, 9),
        baseline_cost_usd=round(baseline, 9),
        cache=env.cache_status,
        retries=env.retries + (out.retries if env.cache_status == "miss" else 0),
        **common,
    )
