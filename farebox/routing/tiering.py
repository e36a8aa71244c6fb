"""The tier an automatic route needs, and why: the job's quality read by the policy's router, then the rules.

With the ``rules`` router (the default) quality low/medium/high needs that tier. With a ``learned`` router
(farebox/routing/learned.py) the job's quality names a level, the share of premium quality to keep; the
router scores the prompt once, and the job needs the premium tier when the score reaches that level's
threshold, else the economy tier. The operator's rules then apply unchanged on top: a task's default tier
when the job gives no quality (no score is needed then), a task's or user tier's/tenant's minimum, and the
user tier's/tenant's cap. Pure: the router is a loaded file, scoring reads only the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from farebox.routing.catalog import TIER_RANK, TIERS, Tier
from farebox.routing.learned import LearnedRouter, prompt_text
from farebox.routing.policy import AccessRule, Policy
from farebox.routing.strategies import RouterRule
from farebox.schemas import Job
from farebox.schemas.job import Quality

Rules = tuple[tuple[str, AccessRule], ...]  # (who, rule): the job's user tier, then its tenant


@dataclass(frozen=True)
class Score:
    """What the learned router said about one job."""

    value: float  # P(the job needs premium)
    threshold: float  # the score at or above which the job's level sends it to premium
    level: float  # the share of premium quality the job's quality keeps
    quality: Quality
    tier: Tier  # the router's answer: premium_tier or economy_tier

    @property
    def note(self) -> str:
        op = ">=" if self.value >= self.threshold else "<"
        return (
            f"learned router score {self.value:.4f} {op} {self.threshold:.4f} "
            f"(quality={self.quality} keeps {self.level * 100:g}% of premium quality): tier {self.tier}"
        )


@dataclass(frozen=True)
class Tiering:
    need: int  # lowest tier rank an automatic route may pick
    cap: int  # highest tier rank the rules allow
    why: tuple[str, ...]  # how ``need`` came about: its base (quality, task default or score), then the rules
    score: Score | None  # None: no learned router, or none needed (a task default applied)

    def head(self, task: str) -> str:
        """The start of an automatic route's reason."""
        tier = TIERS[self.need]
        if self.score is None:
            return f"cheapest {tier}-or-better model for task={task} ({'; '.join(self.why)})"
        rules = f" ({'; '.join(self.why[1:])})" if len(self.why) > 1 else ""
        return f"{self.score.note}; cheapest {tier}-or-better model for task={task}{rules}"


def learned_score(job: Job, rule: RouterRule, router: LearnedRouter) -> Score:
    """Score ``job``'s prompt (every message's content) against the threshold of its quality's level."""
    level = rule.level(job.quality)
    threshold = router.threshold(level)
    value = float(router.score([prompt_text([m.content for m in job.chat])])[0])
    tier = rule.premium_tier if value >= threshold else rule.economy_tier
    return Score(value, threshold, level, job.quality, tier)


def needed_tier(job: Job, task: str, policy: Policy, rules: Rules, router: LearnedRouter | None) -> Tiering:
    """The tier bounds of an automatic route. ``router`` is the policy's learned router (None for rules)."""
    task_rule = policy.tasks.get(task)
    score = None
    if "quality" not in job.model_fields_set and task_rule and task_rule.default_tier:
        need, why = TIER_RANK[task_rule.default_tier], [f"task {task} defaults to {task_rule.default_tier}"]
    elif router is not None and policy.router.kind == "learned":
        score = learned_score(job, policy.router, router)
        need, why = TIER_RANK[score.tier], [score.note]
    else:
        need, why = TIER_RANK[job.quality], [f"quality={job.quality}"]
    if task_rule and task_rule.min_tier and TIER_RANK[task_rule.min_tier] > need:
        need = TIER_RANK[task_rule.min_tier]
        why.append(f"task {task} needs {task_rule.min_tier}")
    cap = TIER_RANK["high"]
    for name, rule in rules:
        if rule.min_tier and TIER_RANK[rule.min_tier] > need:
            need = TIER_RANK[rule.min_tier]
            why.append(f"{name} needs {rule.min_tier}")
        if rule.max_tier and TIER_RANK[rule.max_tier] < cap:
            cap = TIER_RANK[rule.max_tier]
    if need > cap:
        need = cap
        why.append(f"capped at {TIERS[cap]}")
    return Tiering(need, cap, tuple(why), score)
