"""Route stage: pick the cheapest model able to do the job (farebox.routing.choose) and hand the job to
that provider's execute queue. The decision and its reason travel on the envelope. When the policy names a
learned router, ``choose_route`` scores the prompt once (a budget downgrade reuses that pass)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from redis.asyncio import Redis

from farebox.errors import REDIS_DOWN, BudgetExceeded, FareboxError
from farebox.routing.choose import Routed, choose_route, downgrade_route
from farebox.routing.policy import Budget
from farebox.routing.store import CatalogStore
from farebox.schemas import BudgetHold, Envelope
from farebox.settings import Settings
from farebox.stages.budgets import BudgetAlerts, BudgetBook, holds_for
from farebox.stages.circuits import Circuits
from farebox.stages.decode import envelope_from_internal
from farebox.stages.stage import Delivery, EnvelopeStage, Handled, Publish, envelope_publish
from farebox.tokens import count_messages


class RouteStage(EnvelopeStage):
    name = "route"

    def __init__(
        self, settings: Settings, store: CatalogStore, redis: Redis, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.topo = settings.topology
        self.account_queue = self.topo.account
        self.health = Circuits(redis, settings.keys, clock=clock)
        self.book = BudgetBook(redis, settings.keys)
        self.alerts = BudgetAlerts(redis, settings)

    def input_queues(self) -> Sequence[str]:
        return (self.topo.route,)

    def decode(self, delivery: Delivery) -> Envelope:
        return envelope_from_internal(delivery)

    async def handle(self, env: Envelope, delivery: Delivery) -> Handled:
        catalog, policy, router = self.store.current_unit()
        job = env.job
        input_tokens = count_messages((m.role, m.content) for m in job.chat)
        # Circuits open per provider/model, and per provider when all its models fail.
        unhealthy = await self.health.unhealthy([*catalog.providers(), *catalog.models])
        routed = choose_route(job, catalog, policy, input_tokens=input_tokens, unhealthy=unhealthy, router=router)
        holds = holds_for(policy, self.settings.keys, job.tenant, job.user_tier, self.clock())
        update: dict[str, object] = {}
        alerts: list[Publish] = []
        if holds:
            routed, held, alerts = await self._reserve(env, routed, holds)
            update["budgets"] = held
        update["route"] = routed.decision
        if routed.messages != job.chat:
            # Redacted before it leaves us: the provider only ever sees the redacted text. The count
            # was of the text before, so the execute stage counts what it sends.
            update["job"] = job.model_copy(update={"messages": routed.messages, "prompt": None})
        else:
            update["prompt_tokens"] = input_tokens
        decided = env.model_copy(update=update)
        return Handled([envelope_publish(decided, self.topo.execute(routed.decision.provider)), *alerts])

    async def _reserve(
        self, env: Envelope, routed: Routed, holds: list[tuple[Budget, BudgetHold]]
    ) -> tuple[Routed, tuple[BudgetHold, ...], list[Publish]]:
        """Reserve the estimate in every budget of the tenant; on exceed apply the policy's action
        (and raise any alert of that budget not raised yet this period)."""
        budgets = [b for b, _ in holds]
        held = tuple(h for _, h in holds)
        alerts: list[Publish] = []
        try:
            full = await self.book.reserve(env.job_id, list(held), routed.decision.estimated_cost_usd)
        except REDIS_DOWN:
            return routed, (), []  # fail open: nothing reserved, nothing to settle
        if full:
            budget, hold = budgets[full - 1], held[full - 1]
            alerts = await self.alerts.check([hold], [await self.book.spent_usd(hold)], exhausted=True)
            if budget.action == "reject" or any(b.action == "reject" for b in budgets[full:]):
                raise BudgetRefusal(
                    alerts,
                    f"tenant {hold.tenant!r} has used its {budget.period} budget of "
                    f"${budget.limit_usd:g} ({hold.period}); the job was not run",
                )
            routed = downgrade_route(routed)
            await self.book.reserve(env.job_id, list(held), routed.decision.estimated_cost_usd, force=True)
        decision = routed.decision.model_copy(update={"reserved_usd": routed.decision.estimated_cost_usd})
        return replace(routed, decision=decision), held, alerts

    def fail(self, item: object, err: FareboxError) -> Handled:
        handled = super().fail(item, err)
        if isinstance(err, BudgetRefusal):  # the refusal's alerts still go out
            return Handled([*handled.publishes, *err.alerts])
        return handled


class BudgetRefusal(BudgetExceeded):
    """BudgetExceeded carrying the alert messages the refusal raised."""

    def __init__(self, alerts: list[Publish], message: str) -> None:
        super().__init__(message)
        self.alerts = alerts
