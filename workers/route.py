"""Route stage: pick the cheapest model able to do the job (farebox.routing.choose) and hand the job to
that provider's execute queue. The decision and its reason travel on the envelope. When the policy names a
learned router, ``choose_route`` scores the prompt once (a budget downgrade reuses that pass). A job the
route puts on the batch price lane goes to the provider's batch queue instead (farebox/stages/batch_lane.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from redis.asyncio import Redis

from farebox.errors import REDIS_DOWN, BudgetExceeded, FareboxError
from farebox.patches.redis_pipelining import NotReplicated
from farebox.providers.registry import emulator_url, provider_configs
from farebox.routing.auth import internal_sender
from farebox.routing.batch_lane import price_lane
from farebox.routing.choose import Routed, choose_route, downgrade_route
from farebox.routing.experiments import Assignment, assign
from farebox.routing.learned import LearnedRouter
from farebox.routing.policy import Budget, Policy
from farebox.routing.store import CatalogStore, Routing
from farebox.routing.tasks import infer_task
from farebox.schemas import BudgetHold, Envelope, Job, StrategyRef
from farebox.settings import Settings
from farebox.stages.arms import ArmPins
from farebox.stages.budgets import BudgetAlerts, BudgetBook, holds_for
from farebox.stages.circuits import Circuits
from farebox.stages.decode import envelope_from_internal
from farebox.stages.stage import Delivery, EnvelopeStage, Handled, Publish, envelope_publish
from farebox.tokens import count_messages

# Provider kinds whose API has a Batch endpoint the batch stage can drive; an OpenAI-compatible extra has none.
BATCH_KINDS = frozenset({"openai", "anthropic", "gemini"})


class RouteStage(EnvelopeStage):
    name = "route"

    def __init__(
        self,
        settings: Settings,
        store: CatalogStore,
        redis: Redis,
        clock: Callable[[], float] = time.time,
        batch_providers: frozenset[str] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.topo = settings.topology
        self.account_queue = self.topo.account
        self.health = Circuits(redis, settings.keys, clock=clock)
        self.book = BudgetBook(redis, settings.keys)
        self.alerts = BudgetAlerts(redis, settings, lambda: store.current_unit()[1])
        self.pins = ArmPins(redis, settings.keys, ttl_s=settings.result_ttl_s)
        # Once: which providers exist is fixed at start (as for the execute stages); None reads the environment.
        if batch_providers is None:
            configs = provider_configs(os.environ, emulator_url=emulator_url(settings))
            batch_providers = frozenset(name for name, c in configs.items() if c.kind in BATCH_KINDS)
        self.batch_providers = batch_providers

    def input_queues(self) -> Sequence[str]:
        return (self.topo.lane(self.topo.route, "interactive"), self.topo.route)

    def decode(self, delivery: Delivery) -> Envelope:
        return envelope_from_internal(delivery, internal_sender(self.store.current()[1].auth, self.settings.amqp_user))

    async def handle(self, env: Envelope, delivery: Delivery) -> Handled:
        routing = self.store.current_routing()
        catalog, policy = routing.catalog, routing.policy
        job = env.job
        input_tokens = count_messages((m.role, m.content) for m in job.chat)
        # Circuits open per provider/model, and per provider when all its models fail.
        unhealthy = await self.health.unhealthy([*catalog.providers(), *catalog.models])
        task = infer_task(job)
        arm_job, arm_policy, router, arm = await self._arm(env, routing, task, delivery.redelivered)
        routed = choose_route(
            arm_job,
            catalog,
            arm_policy,
            input_tokens=input_tokens,
            unhealthy=unhealthy,
            router=router,
            task=task,
            batch=price_lane(policy.batch, job, env.lane),
            batch_providers=self.batch_providers,
        )
        holds = holds_for(policy, self.settings.keys, job.tenant, job.user_tier, self.clock())
        update: dict[str, object] = {}
        alerts: list[Publish] = []
        if holds:
            routed, held, alerts = await self._reserve(env, routed, holds)
            update["budgets"] = held
        if arm is not None:  # after the reservation: a budget downgrade stays in the arm
            routed = with_strategy(routed, arm)
        update["route"] = routed.decision
        if routed.messages != job.chat:
            # Redacted before it leaves us: the provider only ever sees the redacted text. The count
            # was of the text before, so the execute stage counts what it sends.
            update["job"] = job.model_copy(update={"messages": routed.messages, "prompt": None})
        else:
            update["prompt_tokens"] = input_tokens
        decided = env.model_copy(update=update)
        provider = routed.decision.provider
        queue = self.topo.batch(provider) if routed.decision.price_lane == "batch" else self.topo.execute(provider)
        return Handled([envelope_publish(decided, queue), *alerts])

    async def _arm(
        self, env: Envelope, routing: Routing, task: str, redelivered: bool
    ) -> tuple[Job, Policy, LearnedRouter | None, Assignment | None]:
        """The job, policy and router to route with: those of the job's experiment arm, if one covers it."""
        job, policy = env.job, routing.policy
        if not policy.experiments or job.model is not None:
            return job, policy, routing.router, None
        drawn = assign(policy.experiments, env.job_id, job, task)
        if drawn is not None:
            arm: Assignment | None = await self.pins.pin(env.record, drawn, policy.experiments)
        else:  # a redelivery after a reload that no longer draws the job keeps the arm it had
            arm = await self.pins.kept(env.record, policy.experiments) if redelivered else None
        if arm is None:
            return job, policy, routing.router, None
        plan = routing.arms[arm.experiment, arm.arm]
        if plan.model is not None:  # a fixed-model arm routes the job as if it were pinned
            job = job.model_copy(update={"model": plan.model})
        return job, plan.policy, plan.router, arm

    async def _reserve(
        self, env: Envelope, routed: Routed, holds: list[tuple[Budget, BudgetHold]]
    ) -> tuple[Routed, tuple[BudgetHold, ...], list[Publish]]:
        """Reserve the estimate in every budget of the tenant; on exceed apply the policy's action
        (and raise any alert of that budget not raised yet this period)."""
        budgets = [b for b, _ in holds]
        held = tuple(h for _, h in holds)
        alerts: list[Publish] = []
        try:
            full = await self.book.reserve(env.record, list(held), routed.decision.estimated_cost_usd)
        except NotReplicated:
            # The reserve ran on the master (a replica had not confirmed it yet): keep the holds, so that the
            # account stage releases what the reservation key holds (nothing, if the write was lost).
            decision = routed.decision.model_copy(update={"reserved_usd": routed.decision.estimated_cost_usd})
            return replace(routed, decision=decision), held, []
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
            await self.book.reserve(env.record, list(held), routed.decision.estimated_cost_usd, force=True)
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


def with_strategy(routed: Routed, arm: Assignment) -> Routed:
    """The decision marked with its experiment arm, the reason saying how the job came to be in it."""
    decision = routed.decision
    head = f"experiment {arm.experiment} arm {arm.arm} ({arm.sticky} hash {arm.draw:.4f})"
    marked = decision.model_copy(
        update={"strategy": StrategyRef(experiment=arm.experiment, arm=arm.arm), "reason": f"{head}; {decision.reason}"}
    )
    return replace(routed, decision=marked)
