"""Route stage: pick the cheapest model able to do the job (catalog.routing) and hand the job to
that provider's execute queue. The decision and its reason travel on the envelope."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from redis.asyncio import Redis

from catalog.routing import choose_route
from catalog.store import CatalogStore
from farebox.settings import Settings
from farebox.tokens import count_messages
from schemas import Envelope
from workers.decode import envelope_from_internal
from workers.health import ProviderHealth
from workers.runtime import Delivery, EnvelopeStage, Handled, envelope_publish


class RouteStage(EnvelopeStage):
    name = "route"

    def __init__(self, settings: Settings, store: CatalogStore, redis: Redis,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.topo = settings.topology
        self.account_queue = self.topo.account
        self.health = ProviderHealth(redis, settings.keys, clock=clock)

    def input_queues(self) -> Sequence[str]:
        return (self.topo.route,)

    def decode(self, delivery: Delivery) -> Envelope:
        return envelope_from_internal(delivery)

    async def handle(self, env: Envelope, delivery: Delivery) -> Handled:
        catalog, policy = self.store.current()
        job = env.job
        input_tokens = count_messages((m.role, m.content) for m in job.chat)
        # Circuits open per provider/model, and per provider when all its models fail.
        unhealthy = await self.health.unhealthy([*catalog.providers(), *catalog.models])
        routed = choose_route(job, catalog, policy, input_tokens=input_tokens, unhealthy=unhealthy)
        update: dict[str, object] = {"route": routed.decision}
        if routed.messages != job.chat:
            # Redacted before it leaves us: the provider only ever sees the redacted text.
            update["job"] = job.model_copy(update={"messages": routed.messages, "prompt": None})
        decided = env.model_copy(update=update)
        return Handled([envelope_publish(decided, self.topo.execute(routed.decision.provider))])
