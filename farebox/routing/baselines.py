"""Routers to compare a learned one against, as scores over prompts (``farebox eval --baseline``).

- ``random``: a constant score. With ties broken in expectation its curve is the straight line from all-weak to
  all-strong, APGR 0.5: what any router must beat.
- ``rules``: farebox's rules router as it routes a prompt sent as a plain job (``Job(prompt=...)``: default
  quality, no task, no tenant), with the policy's router forced to the rules one. It decides a tier, not a
  score, so it is scored as a decision-only router: 1 when the chosen model's tier is ``high``, else 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from farebox.errors import FareboxError
from farebox.routing.catalog import Catalog
from farebox.routing.choose import choose_route
from farebox.routing.evaluation import Floats
from farebox.routing.policy import Policy, tier_of
from farebox.schemas import Job
from farebox.tokens import count_text

BASELINES = ("rules", "random")
PREMIUM_TIER = "high"


@dataclass(frozen=True)
class RulesScores:
    scores: Floats  # 1.0: routed to a high-tier model
    refused: int  # prompts the rules refused (too long, blocked): scored 0, as they would not reach premium


def rules_policy(policy: Policy) -> Policy:
    """``policy`` with its router forced to the rules one (when this Policy has a ``router`` field at all)."""
    field = Policy.model_fields.get("router")
    if field is None:
        return policy
    rules = field.get_default(call_default_factory=True)  # the default router is the rules one
    if getattr(rules, "kind", "rules") != "rules":
        raise RuntimeError(f"the default policy router is {rules!r}, not the rules router")
    return policy.model_copy(update={"router": rules})


def rules_scores(prompts: Sequence[str], catalog: Catalog, policy: Policy) -> RulesScores:
    """The rules router's decision per prompt, as 0/1 (see the module docstring)."""
    policy = rules_policy(policy)
    cache: dict[str, float] = {}
    out = np.zeros(len(prompts))
    refused = 0
    for i, prompt in enumerate(prompts):
        if prompt not in cache:
            try:
                job = Job(prompt=prompt or " ")
                routed = choose_route(job, catalog, policy, input_tokens=count_text(prompt))
                model = catalog.get(f"{routed.decision.provider}/{routed.decision.model}")
                tier = tier_of(model, policy) if model is not None else None
                cache[prompt] = 1.0 if tier == PREMIUM_TIER else 0.0
            except FareboxError:
                cache[prompt] = -1.0
        value = cache[prompt]
        if value < 0:
            refused += 1
            value = 0.0
        out[i] = value
    return RulesScores(out, refused)


def random_scores(n: int) -> Floats:
    """A constant score: ties broken in expectation make it the uniformly random router."""
    return np.zeros(n)
