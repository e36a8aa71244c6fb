"""What a set of jobs would cost under the policy, and all on the baseline model, without calling anyone.

Streams: only running sums are kept, so a file of millions of jobs needs constant memory. The expected usage
of a job is its measured input tokens plus the router's output estimate; caching is not modelled (a cache can
only make the real bill smaller).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from farebox.errors import BlockedError, InvalidRequest, describe_validation_error
from farebox.routing.catalog import Catalog
from farebox.routing.choose import Routed, choose_route
from farebox.routing.learned import LearnedRouter
from farebox.routing.policy import Policy, tier_of
from farebox.routing.tasks import baseline_cost_usd, estimate_output_tokens, infer_task
from farebox.schemas import Job, Usage
from farebox.tokens import count_messages

MAX_INVALID_KEPT = 20  # examples of bad lines kept for the report; the count is always exact


@dataclass
class Bucket:
    jobs: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    baseline_cost_usd: float = 0.0

    def add(self, usage: Usage, cost: float, baseline: float) -> None:
        self.jobs += 1
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens
        self.cost_usd += cost
        self.baseline_cost_usd += baseline

    def as_dict(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": self.cost_usd,
            "baseline_cost_usd": self.baseline_cost_usd,
            "savings_usd": self.baseline_cost_usd - self.cost_usd,
        }


@dataclass
class EstimateReport:
    total: Bucket = field(default_factory=Bucket)
    by_task: dict[str, Bucket] = field(default_factory=dict)
    by_tier: dict[str, Bucket] = field(default_factory=dict)
    by_model: dict[str, Bucket] = field(default_factory=dict)
    # How each job's tier was decided, and with it the quality it keeps (see ``quality_basis``).
    by_quality: dict[str, Bucket] = field(default_factory=dict)
    scored: int = 0  # jobs whose tier the learned router decided
    kept_sum: float = 0.0  # the sum of their levels (share of premium quality kept)
    blocked: int = 0
    blocked_by_code: dict[str, int] = field(default_factory=dict)
    invalid: int = 0
    invalid_examples: list[tuple[int | None, str]] = field(default_factory=list)  # (line number, message)
    redacted: int = 0

    @property
    def jobs(self) -> int:
        return self.total.jobs + self.blocked + self.invalid

    @property
    def savings_usd(self) -> float:
        return self.total.baseline_cost_usd - self.total.cost_usd

    @property
    def quality_kept(self) -> float | None:
        """The mean share of premium quality the learned router's jobs keep, as calibrated; None: no such job."""
        return self.kept_sum / self.scored if self.scored else None

    def add_invalid(self, line: int | None, message: str) -> None:
        self.invalid += 1
        if len(self.invalid_examples) < MAX_INVALID_KEPT:
            self.invalid_examples.append((line, message))

    def add_job(
        self,
        job: Job,
        catalog: Catalog,
        policy: Policy,
        *,
        line: int | None = None,
        router: LearnedRouter | None = None,
    ) -> None:
        input_tokens = count_messages((m.role, m.content) for m in job.chat)
        try:
            routed = choose_route(job, catalog, policy, input_tokens=input_tokens, router=router)
        except BlockedError as exc:
            self.blocked += 1
            self.blocked_by_code[exc.code] = self.blocked_by_code.get(exc.code, 0) + 1
            return
        except InvalidRequest as exc:
            self.add_invalid(line, str(exc))
            return
        decision = routed.decision
        task = infer_task(job)
        usage = Usage(input_tokens=input_tokens, output_tokens=estimate_output_tokens(job, task))
        cost = decision.estimated_cost_usd
        baseline = baseline_cost_usd(policy, catalog, usage)
        model = catalog.get(decision.target)
        tier = (tier_of(model, policy) if model else None) or "untiered"
        self.redacted += decision.redacted
        self.total.add(usage, cost, baseline)
        basis = quality_basis(routed)
        score = routed.context.tiering.score if routed.screen is not None else None
        if score is not None:
            self.scored += 1
            self.kept_sum += score.level
        for table, key in (
            (self.by_task, task),
            (self.by_tier, tier),
            (self.by_model, decision.target),
            (self.by_quality, basis),
        ):
            table.setdefault(key, Bucket()).add(usage, cost, baseline)

    def as_dict(self) -> dict[str, Any]:
        def table(t: dict[str, Bucket]) -> dict[str, dict[str, Any]]:
            return {k: t[k].as_dict() for k in sorted(t)}

        return {
            "jobs": self.jobs,
            "routed": self.total.jobs,
            "blocked": self.blocked,
            "blocked_by_code": dict(sorted(self.blocked_by_code.items())),
            "invalid": self.invalid,
            "invalid_examples": [{"line": n, "message": m} for n, m in self.invalid_examples],
            "redacted": self.redacted,
            "cost_usd": self.total.cost_usd,
            "baseline_cost_usd": self.total.baseline_cost_usd,
            "savings_usd": self.savings_usd,
            "savings_pct": (100.0 * self.savings_usd / self.total.baseline_cost_usd)
            if self.total.baseline_cost_usd
            else 0.0,
            "total": self.total.as_dict(),
            "by_task": table(self.by_task),
            "by_tier": table(self.by_tier),
            "by_model": table(self.by_model),
            "by_quality": table(self.by_quality),
            "learned_jobs": self.scored,
            "quality_kept": self.quality_kept,
        }


def quality_basis(routed: Routed) -> str:
    """What a routed job keeps of premium quality: the learned router's level, calibrated on held-back
    outcome data ("medium: learned, keeps 95%"), or how the rules decided when no router scored it."""
    if routed.screen is None:
        return "pinned model"
    score = routed.context.tiering.score
    if score is not None:
        return f"{score.quality}: learned, keeps {score.level * 100:g}% of premium quality"
    return f"{routed.context.job.quality}: rules ({routed.context.tiering.why[0]})"


def estimate_jobs(
    jobs: Iterable[Job], catalog: Catalog, policy: Policy, router: LearnedRouter | None = None
) -> EstimateReport:
    report = EstimateReport()
    for job in jobs:
        report.add_job(job, catalog, policy, router=router)
    return report


def estimate_lines(
    lines: Iterable[str], catalog: Catalog, policy: Policy, router: LearnedRouter | None = None
) -> EstimateReport:
    """Estimate a JSONL stream. A bad line counts as invalid, with its line number; it never stops the run."""
    report = EstimateReport()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            job = Job.model_validate(json.loads(line))
        except json.JSONDecodeError as exc:
            report.add_invalid(number, f"not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        except ValidationError as exc:
            report.add_invalid(number, describe_validation_error(exc))
            continue
        report.add_job(job, catalog, policy, line=number, router=router)
    return report
