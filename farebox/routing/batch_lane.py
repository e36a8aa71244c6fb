"""The price lane a job runs on (the policy's ``batch``): the providers' synchronous APIs, or their Batch APIs.

A batch costs about half the synchronous price and answers within the provider's window (24 h). The lane is,
first to last: the job's own ``lane``; ``sync`` for an interactive job (someone waits for it); then the policy's
``user_tiers`` entry for the job's user tier, its ``tenants`` entry, and ``default``::

    "batch": {"default": "sync", "tenants": {"acme": "batch"}, "user_tiers": {"free": "batch"},
              "linger_s": 60, "min_deadline_s": 86400, "on_line_error": "sync"}

A batch-lane job whose ``deadline_s`` is shorter than ``min_deadline_s`` runs on the sync lane: the providers
promise a batch only within their window. The route stage sends the job to the batch lane only when the model
it picks has a batch price and its provider a Batch API (farebox/routing/choose.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from farebox.routing.strategies import Strict
from farebox.schemas.job import Job, PriceLane

PRICE_LANES: tuple[PriceLane, ...] = ("sync", "batch")


class BatchPolicy(Strict):
    # Sync by default: a job that does not ask waits for nobody's batch, as before the batch lane.
    default: PriceLane = "sync"
    tenants: dict[str, PriceLane] = {}
    user_tiers: dict[str, PriceLane] = {}
    # How long a part-full provider batch waits for more jobs before it is sent anyway.
    linger_s: float = Field(60.0, gt=0, le=86_400)
    max_requests: int | None = Field(None, ge=1)  # lowers the provider's own limit of requests per batch
    max_bytes: int | None = Field(None, ge=1)  # lowers the provider's own limit of bytes per batch file
    # The providers promise a batch within 24 h, so a job that must finish sooner runs on the sync lane.
    min_deadline_s: float = Field(86_400.0, ge=0)
    # A batch line that failed with a retryable error: retried on the sync lane, or the job ends in the error.
    on_line_error: Literal["sync", "error"] = "sync"


def _asked(policy: BatchPolicy, job: Job, priority_lane: str) -> tuple[PriceLane, str]:
    """The lane before the deadline check, and which rule gave it."""
    if job.lane is not None:
        return job.lane, f"job asked for the {job.lane} lane"
    if priority_lane == "interactive":
        return "sync", "interactive job"
    if job.user_tier is not None and job.user_tier in policy.user_tiers:
        return policy.user_tiers[job.user_tier], f"policy batch.user_tiers[{job.user_tier}]"
    if job.tenant in policy.tenants:
        return policy.tenants[job.tenant], f"policy batch.tenants[{job.tenant}]"
    return policy.default, "policy batch.default"


def price_lane(policy: BatchPolicy, job: Job, priority_lane: str) -> tuple[PriceLane, str]:
    """(the price lane ``job`` asks for, a short reason): see the module docstring for the order.
    ``priority_lane`` is the envelope's lane (interactive/background), not a price lane."""
    lane, why = _asked(policy, job, priority_lane)
    if lane == "batch" and job.deadline_s is not None and job.deadline_s < policy.min_deadline_s:
        return "sync", (
            f"deadline_s {job.deadline_s:g} s is shorter than the batch lane's min_deadline_s "
            f"{policy.min_deadline_s:g} s"
        )
    return lane, why
