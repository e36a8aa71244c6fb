"""How many jobs a stage process handles at once, shared by the lanes and, within a lane, by tenants.

A stage holds more jobs than it handles (prefetch, batches), so the order in which held jobs get a slot is
the order they are served in. ``LaneSlots`` decides it:

* a freed slot goes to a waiting interactive job before any background one, and no background job starts
  while an interactive one waits;
* interactive work may hold ``reserve`` slots beyond the ``capacity`` background work is limited to, so a
  backfill, which keeps every slot it may have busy, never makes an interactive job wait for one;
* within a lane the waiting tenants take turns by weight (start-time fair queueing over grants: each grant
  moves its tenant's virtual time on by 1/weight, and the tenant with the least goes next; a tenant that
  starts waiting joins at the lane's virtual time, so an idle tenant banks no credit).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable

from farebox.routing.priority import LANES

PRUNE_AT = 4096  # tenants remembered per lane before those with no debt are forgotten


def even(tenant: str) -> float:
    return 1.0


class _Lane:
    def __init__(self) -> None:
        self.waiting: dict[str, deque[asyncio.Future[None]]] = {}
        self.count = 0  # futures in ``waiting``
        self.vtime: dict[str, float] = {}  # where each tenant's next grant starts
        self.clock = 0.0  # the start of the latest grant


class LaneSlots:
    def __init__(self, capacity: int, reserve: int, weight: Callable[[str], float] = even) -> None:
        self._limit = {"interactive": capacity + reserve, "background": capacity}
        self._lanes: dict[str, _Lane] = {lane: _Lane() for lane in LANES}
        self._weight = weight
        self.in_use = 0

    @contextlib.asynccontextmanager
    async def slot(self, lane: str, tenant: str = "-") -> AsyncIterator[None]:
        await self._acquire(self._lanes[lane], lane, tenant)
        try:
            yield
        finally:
            self.in_use -= 1
            self._wake()

    def waiting(self, lane: str) -> int:
        return self._lanes[lane].count

    def _may_start(self, lane: str) -> bool:
        if self.in_use >= self._limit[lane]:
            return False
        return lane == "interactive" or not self._lanes["interactive"].count

    async def _acquire(self, state: _Lane, lane: str, tenant: str) -> None:
        if not state.count and self._may_start(lane):
            self._grant(state, tenant)
            return
        queue = state.waiting.get(tenant)
        if queue is None:
            queue = state.waiting[tenant] = deque()
            state.vtime[tenant] = max(state.vtime.get(tenant, 0.0), state.clock)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(future)
        state.count += 1
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():  # granted, then cancelled before it could run
                self.in_use -= 1
                self._wake()
            elif future in queue:
                queue.remove(future)
                state.count -= 1
                if not queue:
                    del state.waiting[tenant]
            raise

    def _grant(self, state: _Lane, tenant: str) -> None:
        self.in_use += 1
        start = max(state.vtime.get(tenant, 0.0), state.clock)
        state.clock = start
        state.vtime[tenant] = start + 1.0 / self._weight(tenant)
        if len(state.vtime) > PRUNE_AT:
            state.vtime = {t: v for t, v in state.vtime.items() if v > state.clock or t in state.waiting}

    def _wake(self) -> None:
        for lane in LANES:
            state = self._lanes[lane]
            while state.count and self._may_start(lane):
                tenant = min(state.waiting, key=state.vtime.__getitem__)
                queue = state.waiting[tenant]
                future = queue.popleft()
                state.count -= 1
                if not queue:
                    del state.waiting[tenant]
                if future.done():  # cancelled while it waited
                    continue
                self._grant(state, tenant)
                future.set_result(None)
