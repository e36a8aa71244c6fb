"""A/B experiments over routing strategies: which jobs an experiment covers, and which arm a job is in.

An experiment of the policy names the jobs it covers (tenants, tasks, a share of that traffic) and two or more
arms, each a routing strategy (farebox/routing/strategies.py) with a weight. Assignment is stateless and sticky:
two independent draws from a hash of the experiment's name and the job's ``subject`` (a user id, when the job
gives one) or else its ``job_id``, one for the share and one for the arm, so a redelivered job draws the same
arm and changing the share does not reshuffle the arms. The route stage also pins each job's arm in Redis, so a
policy reload that changes the weights never moves a job that is already running (farebox/stages/arms.py).
Pinned jobs are in no experiment: a pin says which model, so there is no strategy to compare.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from farebox.routing.catalog import Catalog
from farebox.routing.strategies import FixedModel, RouterRule, Strict
from farebox.schemas import Job
from farebox.schemas.job import Task

NAME = r"^[A-Za-z0-9_.-]+$"
TARGET = r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.:@/-]+$"
DAY_S = 86_400
LABEL_TASKS = frozenset({"classify", "extract"})  # answers a label: exact comparison is a fair grade


class Arm(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=NAME)
    weight: float = Field(1.0, ge=0)
    strategy: Annotated[RouterRule | FixedModel, Field(discriminator="kind")]


class Shadow(Strict):
    """Judging without a human: a sampled ``share`` of the jobs a non-reference arm answered is also sent to
    ``reference``, and a grader scores how well the two answers agree (``exact``: the same text once case,
    spaces and punctuation are set aside; ``judge``: ``judge_model`` is asked; ``auto``: exact for label-like
    tasks (classify, extract), the judge for open ones). The score arrives as feedback with source "shadow".
    Shadow calls are evaluation spend, capped at ``cap_usd`` per ``period``."""

    share: float = Field(gt=0, le=1)
    reference: str = Field(pattern=TARGET, max_length=200)
    grader: Literal["exact", "judge", "auto"] = "exact"
    judge_model: str | None = Field(None, pattern=TARGET, max_length=200)
    cap_usd: float = Field(gt=0)
    period: Literal["day", "month"] = "day"

    @model_validator(mode="after")
    def _judge(self) -> Shadow:
        if self.grader != "exact" and self.judge_model is None:
            raise ValueError(f"grader {self.grader!r} needs 'judge_model', the provider/model that judges agreement")
        return self

    def grader_for(self, task: str) -> Literal["exact", "judge"]:
        if self.grader == "auto":
            return "exact" if task in LABEL_TASKS else "judge"
        return self.grader


class Experiment(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=NAME)
    tenants: tuple[str, ...] | None = None  # None: every tenant
    tasks: tuple[Task, ...] | None = None  # None: every task (inferred as the router infers it)
    share: float = Field(1.0, gt=0, le=1)  # of the covered traffic that takes part
    arms: tuple[Arm, ...] = Field(min_length=2)
    shadow: Shadow | None = None
    # How long the prompts of the experiment's jobs are kept for `farebox feedback export` (0: not kept).
    keep_prompts_s: int = Field(7 * DAY_S, ge=0, le=90 * DAY_S)

    @field_validator("arms")
    @classmethod
    def _arms(cls, v: tuple[Arm, ...]) -> tuple[Arm, ...]:
        names = [a.name for a in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"arm names must differ; repeated: {', '.join(dup)}")
        if sum(a.weight for a in v) <= 0:
            raise ValueError("at least one arm needs a weight above 0")
        return v

    def arm(self, name: str) -> Arm | None:
        return next((a for a in self.arms if a.name == name), None)

    def covers(self, job: Job, task: str) -> bool:
        if job.model is not None:
            return False
        if self.tenants is not None and job.tenant not in self.tenants:
            return False
        return self.tasks is None or task in self.tasks


@dataclass(frozen=True)
class Assignment:
    experiment: str
    arm: str
    draw: float  # in [0, 1): where the job's hash fell among the arms' weights
    sticky: Literal["subject", "job_id"]


def unit_draw(*parts: str) -> float:
    """A number in [0, 1) from ``parts``: the same parts give the same number in every process and release."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def pick_arm(experiment: Experiment, draw: float) -> Arm:
    total = sum(a.weight for a in experiment.arms)
    edge = 0.0
    for arm in experiment.arms:
        edge += arm.weight / total
        if draw < edge and arm.weight > 0:
            return arm
    return next(a for a in reversed(experiment.arms) if a.weight > 0)  # float rounding at the top edge


def assign(experiments: tuple[Experiment, ...], job_id: str, job: Job, task: str) -> Assignment | None:
    """The first experiment that covers the job and whose share draws it, and the arm; None for neither."""
    sticky: Literal["subject", "job_id"] = "subject" if job.subject is not None else "job_id"
    key = job.subject if job.subject is not None else job_id
    for experiment in experiments:
        if not experiment.covers(job, task):
            continue
        if experiment.share < 1 and unit_draw("share", experiment.name, key) >= experiment.share:
            continue
        draw = unit_draw("arm", experiment.name, key)
        return Assignment(experiment.name, pick_arm(experiment, draw).name, draw, sticky)
    return None


def check_experiments(experiments: tuple[Experiment, ...], catalog: Catalog) -> list[str]:
    """What makes the experiments unusable with ``catalog`` (the policy check refuses the file for any)."""
    problems = []
    names = [e.name for e in experiments]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"two experiments named {name!r}")
    for e in experiments:
        for arm in e.arms:
            if isinstance(arm.strategy, FixedModel) and catalog.get(arm.strategy.model) is None:
                problems.append(
                    f"experiment {e.name!r} arm {arm.name!r}: model {arm.strategy.model!r} is not in the catalog"
                )
        if e.shadow is not None:
            for role, target in (("reference", e.shadow.reference), ("judge_model", e.shadow.judge_model)):
                if target is not None and catalog.get(target) is None:
                    problems.append(f"experiment {e.name!r} shadow {role}: model {target!r} is not in the catalog")
    return problems
