"""The ledger: one entry per job, written atomically with its aggregates, the stored result, the
cache fill and the release of the job's coalescing lease (one Lua script, one round trip).

``SET NX`` on the entry key makes a redelivered account message unable to charge twice; the
stored result (with a TTL) lets the dedup stage replay a job_id that is already done.
Money is aggregated in integer nano-dollars so totals add up exactly.

A job answered through a provider batch (``result.route.lane == "batch"``) also adds to the ``batch_*`` fields
of its aggregate, among them ``batch_sync_nusd``: what the same usage would have cost on the same model
synchronously, so ``farebox report`` can show the batch lane's own saving. The sync lane is the totals minus
these, so the aggregates of before the batch lane read as all sync.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from farebox.constants import NANO, RedisKeys, job_record
from farebox.schemas import BudgetHold, JobResult
from farebox.stages.lua import Layout, NamedScript, Scalar

STREAM_MAXLEN = 1_000_000

_RECORD_LAYOUT = Layout(
    keys=(
        "result_key",
        "entry_key",
        "day_key",
        "days_key",
        "stream_key",
        "cache_key",
        "lease_key",
        "arms_key",  # the day's experiment aggregates (farebox/strategy_report.py reads them)
        "prompt_key",
    ),
    key_tail="budget_keys",  # the budgets this job reserved against
    args=(
        "result_json",
        "result_ttl_s",
        "entry_json",
        "field_prefix",  # "tenant|provider|model|" of this job's aggregate fields
        "cost_nusd",
        "baseline_nusd",
        "input_tokens",
        "output_tokens",
        "cache_hit",  # 1 or 0
        "is_error",  # 1 or 0
        "day",
        "cache_value",  # '' when the answer is not cached
        "cache_ttl_s",
        "lease_owner",  # the job record (tenant/job_id) when the job holds its coalescing lease, else ''
        "stream_maxlen",
        "reserved_nusd",
        "arm_prefix",  # "experiment|arm|" when an experiment arm routed the job, else ''
        "prompt_json",  # the messages as sent, kept for `farebox feedback export`; '' when not kept
        "prompt_ttl_s",
        "evaluation_nusd",  # the cost again when it is evaluation spend (shadow grading), else 0
        "entry_ttl_s",
        "day_expires_at",  # unix time when this day's aggregates expire
        # New arguments go last: the positions above stay where the script of before had them.
        "is_batch",  # 1 when the job was answered through a provider batch, else 0
        "sync_nusd",  # a batch job's cost at the same model's sync price
    ),
)
_RECORD = """
local existing = redis.call('GET', result_key)
local spent = {}
if not existing then
  if redis.call('SET', entry_key, entry_json, 'NX', 'EX', entry_ttl_s) then
    -- Budgets this job reserved against: release the reservation, add the actual cost.
    for _, budget_key in ipairs(budget_keys) do
      redis.call('HINCRBY', budget_key, 'reserved_nusd', -tonumber(reserved_nusd))
      spent[#spent + 1] = redis.call('HINCRBY', budget_key, 'spent_nusd', cost_nusd)
    end
    local p = field_prefix
    redis.call('HINCRBY', day_key, p .. 'jobs', 1)
    redis.call('HINCRBY', day_key, p .. 'cost_nusd', cost_nusd)
    redis.call('HINCRBY', day_key, p .. 'baseline_nusd', baseline_nusd)
    redis.call('HINCRBY', day_key, p .. 'input_tokens', input_tokens)
    redis.call('HINCRBY', day_key, p .. 'output_tokens', output_tokens)
    redis.call('HINCRBY', day_key, p .. 'cache_hits', cache_hit)
    redis.call('HINCRBY', day_key, p .. 'errors', is_error)
    redis.call('EXPIREAT', day_key, day_expires_at)
    redis.call('SADD', days_key, day)
    redis.call('XADD', stream_key, 'MAXLEN', '~', stream_maxlen, '*', 'entry', entry_json)
    if arm_prefix ~= '' then
      local a = arm_prefix
      redis.call('HINCRBY', arms_key, a .. 'jobs', 1)
      redis.call('HINCRBY', arms_key, a .. 'cost_nusd', cost_nusd)
      redis.call('HINCRBY', arms_key, a .. 'baseline_nusd', baseline_nusd)
      redis.call('HINCRBY', arms_key, a .. 'cache_hits', cache_hit)
      redis.call('HINCRBY', arms_key, a .. 'errors', is_error)
      redis.call('EXPIREAT', arms_key, day_expires_at)
    end
    if is_batch == '1' then
      redis.call('HINCRBY', day_key, p .. 'batch_jobs', 1)
      redis.call('HINCRBY', day_key, p .. 'batch_cost_nusd', cost_nusd)
      redis.call('HINCRBY', day_key, p .. 'batch_baseline_nusd', baseline_nusd)
      redis.call('HINCRBY', day_key, p .. 'batch_sync_nusd', sync_nusd)
      redis.call('HINCRBY', day_key, p .. 'batch_input_tokens', input_tokens)
      redis.call('HINCRBY', day_key, p .. 'batch_output_tokens', output_tokens)
    end
    if evaluation_nusd ~= '0' then
      redis.call('HINCRBY', day_key, p .. 'evaluation_nusd', evaluation_nusd)
    end
    if prompt_json ~= '' then
      redis.call('SET', prompt_key, prompt_json, 'EX', prompt_ttl_s)
    end
  end
  redis.call('SET', result_key, result_json, 'EX', result_ttl_s)
  if cache_value ~= '' then
    redis.call('SET', cache_key, cache_value, 'EX', cache_ttl_s)
  end
end
if lease_owner ~= '' and redis.call('GET', lease_key) == lease_owner then
  redis.call('DEL', lease_key)
end
return {existing or false, unpack(spent)}
"""


@dataclass(frozen=True)
class Recorded:
    existing: bytes | None
    spent_usd: tuple[float, ...] = ()


@dataclass(frozen=True)
class KeptPrompt:
    """An experiment job's messages as sent, kept ``ttl_s`` for ``farebox feedback export``."""

    messages_json: str
    ttl_s: int


@dataclass(frozen=True)
class CacheFill:
    key: str
    value: str
    ttl_s: int


def utc_day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def day_expiry(ts: float, days_kept: int) -> int:
    """When the aggregates of the UTC day holding ``ts`` expire: ``days_kept`` days after that day ends."""
    return (int(ts) // 86_400 + 1 + days_kept) * 86_400


def nano(usd: float) -> int:
    return round(usd * NANO)


def is_batch(result: JobResult) -> bool:
    return result.route is not None and result.route.lane == "batch"


def entry_json(result: JobResult, *, ts: float, evaluation: str | None = None) -> str:
    strategy = result.route.strategy if result.route else None
    arm: dict[str, str] = {"experiment": strategy.experiment, "arm": strategy.arm} if strategy else {}
    if evaluation is not None:
        arm["evaluation"] = evaluation
    return json.dumps(
        {
            **arm,
            "job_id": result.job_id,
            "tenant": result.tenant or "default",
            "provider": result.provider or "",
            "model": result.model or "",
            "status": result.status,
            "cache": result.cache,
            "code": result.error.code if result.error else None,
            "cost_usd": result.cost_usd,
            "baseline_cost_usd": result.baseline_cost_usd,
            "input_tokens": result.usage.input_tokens,
            "output_tokens": result.usage.output_tokens,
            "lane": "batch" if is_batch(result) else "sync",
            "ts": round(ts, 3),
            "day": utc_day(ts),
        },
        separators=(",", ":"),
    )


class Ledger:
    def __init__(self, redis: Redis, keys: RedisKeys, *, result_ttl_s: int, entry_ttl_s: int, days_kept: int) -> None:
        self.redis = redis
        self.keys = keys
        self.result_ttl_s = result_ttl_s
        self.entry_ttl_s = entry_ttl_s
        self.days_kept = days_kept
        self._script = NamedScript(redis, _RECORD_LAYOUT, _RECORD)

    async def record(
        self,
        result: JobResult,
        *,
        ts: float,
        cache: CacheFill | None,
        lease_key: str | None,
        budgets: Sequence[BudgetHold] = (),
        reserved_usd: float = 0.0,
        result_json: str | None = None,
        prompt: KeptPrompt | None = None,
        evaluation: str | None = None,
        sync_cost_usd: float | None = None,
    ) -> Recorded:
        """Record the job once. ``existing`` is the previously stored result when the job was
        already recorded (the caller then replays that one); ``spent_usd`` is each budget's spend
        after settling this job (empty on a replay). ``result_json`` is the result already
        serialised by the caller (the reply body), so it is not serialised twice. ``sync_cost_usd``:
        a batch job's cost at its model's sync price (its own cost when not given)."""
        day = utc_day(ts)
        field_prefix = f"{result.tenant or 'default'}|{result.provider or '-'}|{result.model or '-'}|"
        record = job_record(result.tenant or "default", result.job_id)
        keys = {
            "result_key": self.keys.result(record),
            "entry_key": self.keys.ledger_entry(record),
            "day_key": self.keys.ledger_agg(day),
            "days_key": self.keys.ledger_days,
            "stream_key": self.keys.ledger_stream,
            "cache_key": self.keys.cache(cache.key) if cache else self.keys.cache("-"),
            "lease_key": self.keys.inflight(lease_key) if lease_key else self.keys.inflight("-"),
            "arms_key": self.keys.ledger_arms(day),
            "prompt_key": self.keys.prompt(record),
        }
        strategy = result.route.strategy if result.route else None
        args: dict[str, Scalar] = {
            "result_json": result_json or result.model_dump_json(),
            "result_ttl_s": self.result_ttl_s,
            "entry_json": entry_json(result, ts=ts, evaluation=evaluation),
            "field_prefix": field_prefix,
            "cost_nusd": nano(result.cost_usd),
            "baseline_nusd": nano(result.baseline_cost_usd),
            "input_tokens": result.usage.input_tokens,
            "output_tokens": result.usage.output_tokens,
            "cache_hit": 1 if result.cache != "miss" else 0,
            "is_error": 1 if result.status == "error" else 0,
            "day": day,
            "cache_value": cache.value if cache else "",
            "cache_ttl_s": cache.ttl_s if cache else 0,
            "lease_owner": record if lease_key else "",
            "stream_maxlen": STREAM_MAXLEN,
            "reserved_nusd": nano(reserved_usd),
            "arm_prefix": f"{strategy.experiment}|{strategy.arm}|" if strategy else "",
            "prompt_json": prompt.messages_json if prompt else "",
            "prompt_ttl_s": prompt.ttl_s if prompt else 0,
            "evaluation_nusd": nano(result.cost_usd) if evaluation else 0,
            "entry_ttl_s": self.entry_ttl_s,
            "day_expires_at": day_expiry(ts, self.days_kept),
            "is_batch": 1 if is_batch(result) else 0,
            "sync_nusd": nano(result.cost_usd if sync_cost_usd is None else sync_cost_usd),
        }
        reply = await self._script(keys=keys, args=args, key_tail=[hold.key for hold in budgets])
        existing = reply[0] if reply else None
        return Recorded(
            existing=existing.encode() if isinstance(existing, str) else existing,
            spent_usd=tuple(int(v) / NANO for v in reply[1:]),
        )
