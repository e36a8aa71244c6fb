"""Pure construction of the caller's result from a finished envelope.

A job answered through a provider batch (route on the batch price lane and an outcome carrying the batch's id)
pays the model's batch price; one that fell back to the sync lane has no batch id and pays the sync price. The
baseline is always the baseline model's sync price: the saving of the batch lane is part of the saving."""

from __future__ import annotations

from farebox.routing.catalog import Catalog, cost_usd
from farebox.routing.policy import Policy
from farebox.routing.tasks import baseline_cost_usd
from farebox.schemas import Envelope, ErrorInfo, JobResult, RouteInfo, Usage


def answered_in_batch(env: Envelope) -> bool:
    """Whether the job's answer came from a provider batch, at the batch price (a cached copy of such an
    answer costs nothing and is no batch job)."""
    return (
        env.cache_status == "miss"
        and env.error is None
        and env.route is not None
        and env.route.price_lane == "batch"
        and env.outcome is not None
        and env.outcome.batch_id is not None
    )


def sync_cost_usd(env: Envelope, catalog: Catalog) -> float | None:
    """What a batch-answered job's usage would have cost on the same model synchronously (the ledger's
    ``batch_sync_nusd``); None for every other job."""
    out = env.outcome
    if out is None or not answered_in_batch(env):
        return None
    info = catalog.get(f"{out.provider}/{out.model}")
    return round(cost_usd(info, out.usage), 9) if info is not None else None


def build_result(env: Envelope, catalog: Catalog, policy: Policy, *, now: float) -> JobResult:
    route = None
    if env.route is not None:
        route = RouteInfo(
            reason=env.route.reason,
            candidates=env.route.candidates,
            fallbacks=env.fallbacks,
            strategy=env.route.strategy,
            lane="batch" if answered_in_batch(env) else "sync",
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
        cost = cost_usd(info, usage, batch=answered_in_batch(env)) if info is not None else 0.0
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
