"""How many jobs a stage process handles at once, shared by the lanes and, within a lane, by tenants.

A stage holds more jobs than it handles (prefetch, batches), so the order in which held jobs get a slot is
the order they are served in. ``LaneSlots`` decides it:

* a freed slot goes to a waiting interactive job before any background one, and no background job starts
  while an interactive one waits, except that when both wait, after ``background_every`` interactive grants
  the next goes to background work (a turn that may use the interactive limit): a flood marked
  interactive slows a backfill down but cannot stop it;
* interactive work may hold ``reserve`` slots beyond the ``capacity`` background work is limited to, so a
  backfill, which keeps every slot it may have busy, never makes an interactive job wait for one;
* within a lane the waiting tenants take turns by weight (start-time fair queueing over grants: each grant
  moves its tenant's virtual time on by 1/weight, and the tenant with the least goes next; a tenant that
  starts waiting joins at the lane's virtual time, so an idle tenant banks no credit).

A grant costs O(log tenants): the waiting tenants are a heap by virtual time, and an idle tenant's debt is
remembered in a second heap until the lane's clock passes it. Past ``REMEMBERED`` idle tenants the ones
owing least are forgotten first (each may then start up to one grant early when it comes back), so a
stream of one-job tenants cannot grow the table without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable

from farebox.routing.priority import LANES

REMEMBERED = 4096  # idle tenants whose debt a lane keeps
BACKGROUND_EVERY = 10  # when both lanes wait, one grant after this many interactive ones is background (0: never)


def even(tenant: str) -> float:
    return 1.0


class _Lane:
    def __init__(self) -> None:
        self.waiting: dict[str, deque[asyncio.Future[None]]] = {}
        self.count = 0  # futures in ``waiting``
        self.vtime: dict[str, float] = {}  # where each waiting or remembered tenant's next grant starts
        self.clock = 0.0  # the start of the latest grant
        self.ready: list[tuple[float, int, str]] = []  # waiting tenants by vtime (stale entries skipped)
        self.idle: list[tuple[float, str]] = []  # remembered idle tenants by vtime (stale entries skipped)
        self._seq = itertools.count()  # ties go in the order tenants were queued

    def queue(self, tenant: str) -> deque[asyncio.Future[None]]:
        queue = self.waiting.get(tenant)
        if queue is None:
            queue = self.waiting[tenant] = deque()
            self.vtime[tenant] = max(self.vtime.get(tenant, 0.0), self.clock)
            heapq.heappush(self.ready, (self.vtime[tenant], next(self._seq), tenant))
        return queue

    def next_tenant(self) -> str:
        """The waiting tenant whose turn it is (``count`` > 0)."""
        while True:
            v, _, tenant = self.ready[0]
            if tenant in self.waiting and self.vtime[tenant] == v:
                return tenant
            heapq.heappop(self.ready)

    def charge(self, tenant: str, weight: float) -> None:
        """A grant to ``tenant``: the clock moves to its start, its next one is 1/weight further on."""
        start = max(self.vtime.get(tenant, 0.0), self.clock)
        self.clock = start
        self.vtime[tenant] = start + 1.0 / weight
        if tenant in self.waiting:
            heapq.heappop(self.ready)  # its entry is the top: next_tenant() chose it
            heapq.heappush(self.ready, (self.vtime[tenant], next(self._seq), tenant))
        else:
            heapq.heappush(self.idle, (self.vtime[tenant], tenant))
        self.forget()

    def stop_waiting(self, tenant: str) -> None:
        del self.waiting[tenant]
        heapq.heappush(self.idle, (self.vtime[tenant], tenant))
        if len(self.ready) > 4 * len(self.waiting) + 64:  # stale entries of tenants that left without a grant
            self.ready = [e for e in self.ready if e[2] in self.waiting and self.vtime[e[2]] == e[0]]
            heapq.heapify(self.ready)
        self.forget()

    def forget(self) -> None:
        """Drop idle tenants the clock has passed (their debt is paid), and past ``REMEMBERED`` the least owing."""
        while self.idle:
            v, tenant = self.idle[0]
            if tenant in self.waiting or self.vtime.get(tenant) != v:
                heapq.heappop(self.idle)  # stale: it queued again, or was forgotten already
            elif v <= self.clock or len(self.vtime) - len(self.waiting) > REMEMBERED:
                heapq.heappop(self.idle)
                del self.vtime[tenant]
            else:
                break
        if len(self.idle) > 4 * REMEMBERED:  # stale entries deep in the heap
            self.idle = [(v, t) for v, t in self.idle if t not in self.waiting and self.vtime.get(t) == v]
            heapq.heapify(self.idle)


class LaneSlots:
    def __init__(
        self,
        capacity: int,
        reserve: int,
        weight: Callable[[str], float] = even,
        *,
        background_every: int = BACKGROUND_EVERY,
    ) -> None:
        self._limit = {"interactive": capacity + reserve, "background": capacity}
        self._lanes: dict[str, _Lane] = {lane: _Lane() for lane in LANES}
        self._weight = weight
        self._background_every = background_every
        self._streak = 0  # interactive jobs granted from the queue in a row while background work waited
        self.in_use = 0

    @contextlib.asynccontextmanager
    async def slot(self, lane: str, tenant: str = "-") -> AsyncIterator[None]:
        await self._acquire(self._lanes[lane], tenant)
        try:
            yield
        finally:
            self.in_use -= 1
            self._wake()

    def waiting(self, lane: str) -> int:
        return self._lanes[lane].count

    def _next_lane(self, joining: str | None = None) -> str | None:
        """The lane the next free slot goes to, or None while no waiting job may start (counting, for
        ``joining``, one more job waiting in that lane)."""
        queued = self._lanes["interactive"].count  # a turn for background needs interactive jobs really queued
        interactive = queued + (joining == "interactive")
        background = self._lanes["background"].count + (joining == "background")
        if (
            background
            and queued
            and self._background_every
            and self._streak >= self._background_every
            and self.in_use < self._limit["interactive"]
        ):
            return "background"  # its turn
        if interactive and self.in_use < self._limit["interactive"]:
            return "interactive"
        if background and not interactive and self.in_use < self._limit["background"]:
            return "background"
        return None

    async def _acquire(self, state: _Lane, tenant: str) -> None:
        lane = "interactive" if state is self._lanes["interactive"] else "background"
        if not state.count and self._next_lane(joining=lane) == lane:  # nobody to overtake: no future needed
            self._grant(lane, state, tenant, queued=False)
            return
        queue = state.queue(tenant)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(future)
        state.count += 1
        self._wake()  # a free slot goes to whoever's turn it is, which may be this job
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
                    state.stop_waiting(tenant)
            raise

    def _wake(self) -> None:
        while (lane := self._next_lane()) is not None:
            state = self._lanes[lane]
            tenant = state.next_tenant()
            queue = state.waiting[tenant]
            future = queue.popleft()
            state.count -= 1
            if future.done():  # cancelled while it waited
                if not queue:
                    state.stop_waiting(tenant)
                continue
            if not queue:
                del state.waiting[tenant]  # charge() remembers its debt, once, at the new virtual time
            self._grant(lane, state, tenant, queued=True)
            future.set_result(None)

    def _grant(self, lane: str, state: _Lane, tenant: str, *, queued: bool) -> None:
        if lane == "background":
            self._streak = 0
        elif queued and self._lanes["background"].count:  # an interactive job went ahead of waiting background
            self._streak += 1
        self.in_use += 1
        state.charge(tenant, self._weight(tenant))
