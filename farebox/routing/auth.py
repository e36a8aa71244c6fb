"""Who may act for which tenant: the policy's ``auth`` and the AMQP ``user_id`` RabbitMQ vouches for.

RabbitMQ refuses a publish whose ``user_id`` property is not the connection's user (406), so in mode
``user_id`` a job's or a feedback message's ``user_id`` is its sender's RabbitMQ user, and the policy says
which tenants that user may act for. Mode ``open`` (the default) trusts the ``tenant`` the body names: right
for one team on its own broker, wrong for several, where any producer could spend or read another's.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from farebox.errors import Forbidden
from farebox.routing.strategies import Strict

TENANT = r"^[A-Za-z0-9_.@-]+$"


class AuthPolicy(Strict):
    mode: Literal["open", "user_id"] = "open"
    users: dict[str, tuple[str, ...]] = Field(default_factory=dict)  # AMQP user -> tenants it may act for

    @model_validator(mode="after")
    def _users(self) -> AuthPolicy:
        if self.mode == "user_id" and not self.users:
            raise ValueError("mode 'user_id' needs 'users': each AMQP user and the tenants it may act for")
        for user, tenants in self.users.items():
            if not tenants:
                raise ValueError(f"user {user!r} may act for no tenant: give at least one, or leave it out")
        return self


def internal_sender(auth: AuthPolicy, pipeline_user: str) -> str | None:
    """Who messages between stages must come from: in mode ``user_id``, the pipeline's own RabbitMQ user (a
    producer may publish to any queue through the default exchange, so a stage must not take its word);
    in mode ``open``, anyone (as for jobs)."""
    return pipeline_user if auth.mode == "user_id" else None


def acting_tenant(auth: AuthPolicy, user_id: str | None, tenant: str, tenant_given: bool) -> str:
    """The tenant a message may act for: its own ``tenant`` when its sender may act for it, the sender's only
    tenant when it names none; Forbidden otherwise. Messages never quote tenants the sender may not see."""
    if auth.mode == "open":
        return tenant
    if not user_id:
        raise Forbidden(
            "the message has no AMQP user_id and this pipeline's policy requires one (auth mode user_id): "
            "publish with the user_id property set to your RabbitMQ user"
        )
    allowed = auth.users.get(user_id)
    if not allowed:
        raise Forbidden(f"RabbitMQ user {user_id!r} may not act for any tenant here (policy auth.users)")
    if not tenant_given:
        if len(allowed) == 1:
            return allowed[0]
        raise Forbidden(f"RabbitMQ user {user_id!r} acts for several tenants: name one in 'tenant'")
    if tenant not in allowed:
        raise Forbidden(f"RabbitMQ user {user_id!r} may not act for tenant {tenant!r}")
    return tenant
