"""The result farebox publishes to the caller's ``reply_to`` (CONTRACT.md)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ErrorCode = Literal[
    "invalid_request", "blocked", "budget_exceeded", "provider_error", "timeout", "internal", "forbidden"
]
CacheStatus = Literal["miss", "hit", "coalesced"]


class Usage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    input_tokens: int = Field(0, ge=0)
    output_tokens: int = Field(0, ge=0)
    cached_input_tokens: int = Field(0, ge=0)


class StrategyRef(BaseModel):
    """The experiment and arm (farebox/routing/experiments.py) whose routing strategy routed a job."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    experiment: str
    arm: str


class RouteInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    reason: str
    candidates: tuple[str, ...] = ()
    fallbacks: tuple[str, ...] = ()  # provider/model tried first and given up on, in order
    strategy: StrategyRef | None = None  # set when an experiment of the policy covered the job
    lane: Literal["sync", "batch"] = "sync"  # batch: answered through the provider's Batch API, at its batch rate


class ErrorInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    code: ErrorCode
    message: str


class JobResult(BaseModel):
    # Callers parse this; new optional fields may appear, so it is lenient on read.
    model_config = ConfigDict(frozen=True, extra="ignore")

    job_id: str
    status: Literal["ok", "error"]
    content: str | None = None
    provider: str | None = None
    model: str | None = None
    usage: Usage = Usage()
    cost_usd: float = 0.0
    baseline_cost_usd: float = 0.0
    cache: CacheStatus = "miss"
    route: RouteInfo | None = None
    error: ErrorInfo | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    tenant: str | None = None
    # From intake to when the result was made: before its record and reply, which store and send this very result
    # (a one-trip hit's is made before its lookup).
    latency_ms: float | None = None
    retries: int = 0  # provider call retries this job needed, across fallbacks
