"""Routing strategies: what turns a job's quality into the tier it needs (the policy's ``router``), or a fixed
model. The policy routes every job with its ``router``; an experiment's arms (farebox/routing/experiments.py)
each name one of these instead."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from farebox.routing.catalog import TIER_RANK, Tier
from farebox.schemas.job import Quality

QUALITIES: tuple[Quality, ...] = ("low", "medium", "high")


class Strict(BaseModel):
    # Frozen and closed: a typo in the policy file ("min_teir") is an error, never a silent default.
    model_config = ConfigDict(frozen=True, extra="forbid")


class RouterRule(Strict):
    """Which router sets the tier a job's quality needs. ``rules`` (the default): quality low/medium/high needs
    that tier. ``learned``: a router file scores the prompt; quality names a level (the share of premium
    quality to keep), whose threshold sends the job to ``premium_tier`` at or above it, else ``economy_tier``.
    ``path`` is relative to the policy file's folder unless absolute or "builtin" (the file shipped)."""

    kind: Literal["rules", "learned"] = "rules"
    path: str | None = Field(None, min_length=1)
    levels: dict[Quality, float] | None = None
    premium_tier: Tier = "high"
    economy_tier: Tier = "low"

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: dict[Quality, float] | None) -> dict[Quality, float] | None:
        for quality, level in (v or {}).items():
            if not 0 < level <= 1:
                raise ValueError(f"level of quality {quality!r} is {level:g}: a share of premium quality in (0, 1]")
        return v

    @model_validator(mode="after")
    def _kind(self) -> RouterRule:
        if self.kind == "rules":
            given = [f for f in ("path", "levels", "premium_tier", "economy_tier") if f in self.model_fields_set]
            if given:
                raise ValueError(f"{', '.join(given)}: only for kind 'learned' (this router is kind 'rules')")
            return self
        if self.path is None:
            raise ValueError("kind 'learned' needs 'path': a router file, or \"builtin\" for the one shipped")
        missing = [q for q in QUALITIES if q not in (self.levels or {})]
        if missing:
            raise ValueError(f"kind 'learned' needs a level for every quality; missing: {', '.join(missing)}")
        if TIER_RANK[self.economy_tier] >= TIER_RANK[self.premium_tier]:
            raise ValueError(f"economy_tier {self.economy_tier!r} must be below premium_tier {self.premium_tier!r}")
        return self

    def level(self, quality: Quality) -> float:
        assert self.levels is not None
        return self.levels[quality]


class FixedModel(Strict):
    """Every job of the arm goes to one model (as if pinned; the policy's rules still check it)."""

    kind: Literal["model"]
    model: str = Field(pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.:@/-]+$", max_length=200)


Strategy = RouterRule | FixedModel
