"""Lanes: which jobs are served first (the policy's ``priority``), and how tenants share a lane.

A job is ``interactive`` (someone waits for it) or ``background`` (a backfill). Interactive work is served
ahead of background work at every stage; within a lane, tenants take turns by weight for each execute
process's provider calls (farebox/stages/slots.py). The lane a job runs in is, first to last: its own
``priority`` field; then ``interactive`` when it came in through the interactive intake; then the policy's
``users`` entry for the RabbitMQ user that sent it, its ``tenants`` entry, and ``default``::

    "priority": {"default": "background", "tenants": {"helpdesk": "interactive"},
                 "users": {"chat-frontend": "interactive"}, "weights": {"acme": 2},
                 "allow_interactive": ["helpdesk", "support"]}

The first two are the producer's to choose. ``allow_interactive``, when present, names the tenants whose
producers may (``"*"``: every tenant, as when it is absent); another tenant's job that asks for the interactive
lane gets the lane the operator's entries give it, so a backfill marked interactive runs as one.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from farebox.routing.strategies import Strict
from farebox.schemas.job import Job, Priority

LANES: tuple[Priority, ...] = ("interactive", "background")  # the order they are served in


class PriorityPolicy(Strict):
    # Background by default: a producer that sets only the body shares one FIFO with the backfills, as before
    # the lanes, and interactive work stays the light load its lane is for. `farebox ask` and the client's
    # complete() send interactive jobs; the policy can make a tenant's or a user's jobs interactive.
    default: Priority = "background"
    tenants: dict[str, Priority] = {}
    users: dict[str, Priority] = {}  # AMQP user (as RabbitMQ checked it) -> lane
    # A tenant's share of a lane's slots against the others busy in it (default 1); "*" sets the default.
    weights: dict[str, float] = Field(default_factory=dict)
    allow_interactive: frozenset[str] | None = None  # tenants whose jobs may ask for interactive; None: all

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        bad = sorted(t for t, w in v.items() if not 0 < w <= 1000)
        if bad:
            raise ValueError(f"each weight is in (0, 1000]; not so for {', '.join(map(repr, bad))}")
        return v

    def lane(self, job: Job, *, user_id: str | None, interactive_intake: bool) -> Priority:
        """The lane ``job`` runs in (see the module docstring for the order)."""
        asked = job.priority or ("interactive" if interactive_intake else None)
        if asked == "background" or (asked == "interactive" and self.may_ask_interactive(job.tenant)):
            return asked
        if user_id is not None and user_id in self.users:
            return self.users[user_id]
        return self.tenants.get(job.tenant, self.default)

    def may_ask_interactive(self, tenant: str) -> bool:
        allowed = self.allow_interactive
        return allowed is None or tenant in allowed or "*" in allowed

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, self.weights.get("*", 1.0))
