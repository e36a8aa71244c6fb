"""Budgets: reserve a job's estimated cost before it runs (route stage), settle the actual cost
after (account stage, inside the ledger script), and raise each alert threshold once per period.

Reservation checks spent + reserved + this estimate against the limit atomically in Redis, so
any number of route replicas together overshoot a budget by at most what one job's actual cost
exceeds its estimate. Keys: ``{b:<tenant>}:budget:[<user_tier>:]<period>:<id>``, a hash with
``spent_nusd`` and ``reserved_nusd`` (integer nano-dollars, like the ledger). A job's reservation key sits in
its tenant's slot with them (farebox/constants.py), so reserving is one script in one Redis Cluster slot; the
ledger settles it (farebox/stages/ledger.py) and marks it ``settled``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence

import httpx
from redis.asyncio import Redis

from farebox import metrics
from farebox.constants import NANO, JobRecord, RedisKeys
from farebox.routing.policy import Budget, Policy
from farebox.schemas import BudgetHold
from farebox.settings import Settings
from farebox.stages.ledger_entry import nano
from farebox.stages.lua import Layout, NamedScript
from farebox.stages.stage import Publish

log = logging.getLogger("farebox.budget")

PERIOD_TTL_S = 40 * 86_400

# Returns 0 when every budget has room (and reserves in all of them), else the 1-based index of
# the first budget that does not. With mode "force" it reserves without checking. The
# reservation key marks the job as reserved, so a redelivered route message never reserves twice.
_RESERVE_LAYOUT = Layout(
    keys=("reservation_key",),
    key_tail="budget_keys",
    args=("mode", "estimate_nusd", "ttl_s"),
    arg_tail="limits_nusd",  # one per budget key, in the same order
)
_RESERVE = """
local est = tonumber(estimate_nusd)
if redis.call('EXISTS', reservation_key) == 1 then
  return 0
end
if mode ~= 'force' then
  for i, key in ipairs(budget_keys) do
    local spent = tonumber(redis.call('HGET', key, 'spent_nusd') or '0')
    local reserved = tonumber(redis.call('HGET', key, 'reserved_nusd') or '0')
    if spent + reserved + est > tonumber(limits_nusd[i]) then
      return i
    end
  end
end
for _, key in ipairs(budget_keys) do
  redis.call('HINCRBY', key, 'reserved_nusd', est)
  redis.call('EXPIRE', key, tonumber(ttl_s))
end
redis.call('SET', reservation_key, est, 'EX', tonumber(ttl_s))
return 0
"""


def period_id(period: str, ts: float) -> str:
    return f"{period}:" + time.strftime("%Y-%m-%d" if period == "day" else "%Y-%m", time.gmtime(ts))


def holds_for(
    policy: Policy, keys: RedisKeys, tenant: str, user_tier: str | None, ts: float
) -> list[tuple[Budget, BudgetHold]]:
    out = []
    for budget in policy.budgets_for(tenant, user_tier):
        period = period_id(budget.period, ts)
        out.append(
            (
                budget,
                BudgetHold(
                    key=keys.budget(tenant, period, budget.user_tier),
                    tenant=tenant,
                    period=period,
                    limit_usd=budget.limit_usd,
                    alerts=budget.alerts,
                ),
            )
        )
    return out


class BudgetBook:
    def __init__(self, redis: Redis, keys: RedisKeys) -> None:
        self.redis = redis
        self.keys = keys
        self._reserve = NamedScript(redis, _RESERVE_LAYOUT, _RESERVE, "budget reserve")

    async def reserve(
        self, record: JobRecord, holds: list[BudgetHold], estimate_usd: float, *, force: bool = False
    ) -> int:
        """0 if reserved in every budget (or already, for this job), else the 1-based index of the
        first one without room."""
        if not holds:
            return 0
        reply = await self._reserve(
            keys={"reservation_key": self.keys.reservation(record)},
            key_tail=[h.key for h in holds],
            args={"mode": "force" if force else "check", "estimate_nusd": nano(estimate_usd), "ttl_s": PERIOD_TTL_S},
            arg_tail=[nano(h.limit_usd) for h in holds],
        )
        return int(reply)

    async def spent_usd(self, hold: BudgetHold) -> float:
        value = await self.redis.hget(hold.key, "spent_nusd")
        return int(value or 0) / NANO


class BudgetAlerts:
    """Each alert threshold fires once per budget period, across all replicas (SADD decides):
    a log line, a metric, a message on the alerts exchange and, when configured, a webhook POST.
    At most once: a crash between the SADD and the publish loses that one alert.

    ``policy`` gives the policy in force, for the metric labels: a tenant it does not name (one a "*" budget
    covers) gets no budget gauge and counts its alerts under "other". Without it no tenant is named."""

    def __init__(self, redis: Redis, settings: Settings, policy: Callable[[], Policy] | None = None) -> None:
        self.redis = redis
        self.policy = policy
        self.exchange = settings.topology.alerts_exchange
        self.webhook_url = settings.alert_webhook_url
        self._posts: set[asyncio.Task[None]] = set()

    async def check(
        self, holds: Sequence[BudgetHold], spent_usd: Sequence[float], *, exhausted: bool = False
    ) -> list[Publish]:
        """Alerts for thresholds the spend has reached; ``exhausted`` (a job was just refused or
        downgraded for this budget) counts as having reached all of them."""
        out = []
        named = self.policy().named_tenants if self.policy is not None else frozenset[str]()
        for hold, spent in zip(holds, spent_usd, strict=False):
            ratio = max(spent / hold.limit_usd, 1.0 if exhausted else 0.0)
            label = metrics.tenant_label(hold.tenant, named)
            if hold.tenant in named:  # a gauge shared by all the "other" tenants would mean nothing
                metrics.child(metrics.BUDGET_USED, label, hold.period.split(":")[0]).set(ratio)
            fired = f"{hold.key}:alerts"
            for threshold in hold.alerts:
                if ratio < threshold or not await self.redis.sadd(fired, f"{threshold:g}"):
                    continue
                await self.redis.expire(fired, PERIOD_TTL_S)
                alert = {
                    "type": "budget",
                    "tenant": hold.tenant,
                    "period": hold.period,
                    "threshold": threshold,
                    "spent_usd": round(spent, 9),
                    "limit_usd": hold.limit_usd,
                    "ts": round(time.time(), 3),
                }
                log.warning(
                    "budget alert: tenant %s has spent %.0f%% of its %s budget ($%.6f of $%.2f)",
                    hold.tenant,
                    100 * ratio,
                    hold.period,
                    spent,
                    hold.limit_usd,
                    extra={"tenant": hold.tenant, "threshold": threshold},
                )
                metrics.child(metrics.BUDGET_ALERTS, label, f"{threshold:g}").inc()
                body = json.dumps(alert).encode()
                out.append(
                    Publish(exchange=self.exchange, routing_key=f"budget.{hold.tenant}", body=body, mandatory=False)
                )
                if self.webhook_url:
                    task = asyncio.get_running_loop().create_task(self._post(body))
                    self._posts.add(task)
                    task.add_done_callback(self._posts.discard)
        return out

    async def _post(self, body: bytes) -> None:
        assert self.webhook_url is not None
        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                await client.post(self.webhook_url, content=body, headers={"content-type": "application/json"})
        except httpx.HTTPError as err:
            log.warning("budget alert webhook failed (%s)", type(err).__name__)
