"""The internal message that carries one job from stage to stage.

Each stage fills in its part (cache key, route, outcome, error) and hands the envelope on; the
account stage turns it into the caller's result. Internal, so ``extra="forbid"`` and versioned.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from farebox.constants import JobRecord, job_record
from farebox.schemas.job import Job, PriceLane, Priority
from farebox.schemas.result import CacheStatus, ErrorInfo, StrategyRef, Usage


class RouteDecision(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    provider: str
    model: str
    reason: str
    candidates: tuple[str, ...]  # "provider/model", cheapest first; the chosen one is first
    estimated_cost_usd: float = 0.0
    reserved_usd: float = 0.0  # budget reservation the account stage settles
    redacted: bool = False
    strategy: StrategyRef | None = None  # the experiment arm that routed the job, if any
    price_lane: PriceLane = "sync"  # batch: through the provider's Batch API, priced at its batch rate

    @property
    def target(self) -> str:
        return f"{self.provider}/{self.model}"


class BudgetHold(BaseModel):
    """A budget this job reserved against; the account stage settles it with the actual cost."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str  # the Redis hash for this tenant (and user tier) and period
    tenant: str
    period: str  # e.g. "month:2026-11"
    limit_usd: float
    alerts: tuple[float, ...] = ()


class Outcome(BaseModel):
    """What a provider answered (or what the cache held)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    content: str
    provider: str
    model: str
    usage: Usage
    latency_s: float = 0.0
    retries: int = 0
    batch_id: str | None = None  # the provider batch that answered (the batch lane)


class Evaluation(BaseModel):
    """Marks an internal evaluation job (shadow grading, farebox/stages/shadow.py): its cost is evaluation spend
    under the experiment's cap, it has no caller, and its answer is graded against the job it shadows."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["shadow", "judge"]  # shadow: the reference model's answer; judge: the judge model's verdict
    experiment: str
    arm: str  # the arm of the job being graded
    of_job_id: str  # the job being graded
    answer: str  # that job's answer
    answered_by: str  # provider/model that gave it
    reference: str  # the reference model (provider/model)
    reference_answer: str | None = None  # for a judge: what the reference answered
    grader: Literal["exact", "judge"] = "exact"
    judge_model: str | None = None
    estimated_nusd: int = 0  # reserved against the experiment's shadow cap; settled with the actual cost
    cap_key: str = ""  # the Redis key of that period's shadow spend


class Envelope(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1
    job_id: str
    job: Job
    reply_to: str | None = None
    correlation_id: str | None = None
    received_at: float
    deadline_at: float | None = None
    cache_key: str | None = None  # set when the job may be served from / stored in the cache
    coalesce_key: str | None = None  # identical in-flight jobs share it; the leader holds its lease
    waits: int = Field(0, ge=0)  # times this job has waited for a coalesced leader
    # The lane the dedup stage resolved (farebox/routing/priority.py): every hop after it publishes to that lane's
    # queue. Background when absent: shadow grading, and envelopes from before the lanes.
    lane: Priority = "background"
    route: RouteDecision | None = None
    # Tokens of job.chat as it now stands, counted by the route stage so that the execute stage's
    # tokens-per-minute limit need not count again; None (older messages, or after a redaction) counts there.
    prompt_tokens: int | None = Field(None, ge=0)
    fallbacks: tuple[str, ...] = ()  # targets that failed, in order
    retries: int = Field(0, ge=0)  # provider retries spent so far, across fallbacks
    budgets: tuple[BudgetHold, ...] = ()  # reservations to settle (route.reserved_usd each)
    outcome: Outcome | None = None
    cache_status: CacheStatus = "miss"
    error: ErrorInfo | None = None
    evaluation: Evaluation | None = None  # set on shadow-grading jobs only

    @property
    def record(self) -> JobRecord:
        """What names this job's records in Redis (its tenant and job_id)."""
        return job_record(self.job.tenant, self.job_id)
