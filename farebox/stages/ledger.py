"""The ledger: one entry per job, written atomically with its aggregates, the stored result, the
cache fill and the release of the job's coalescing lease (one Lua script, one round trip).

``SET NX`` on the entry key makes a redelivered account message unable to charge twice; the
stored result (with a TTL) lets the dedup stage replay a job_id that is already done.
Money is aggregated in integer nano-dollars so totals add up exactly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from farebox.constants import NANO, RedisKeys
from farebox.schemas import BudgetHold, JobResult

STREAM_MAXLEN = 1_000_000

_RECORD = """
local existing = redis.call('GET', KEYS[1])
local spent = {}
if not existing then
  if redis.call('SET', KEYS[2], ARGV[3], 'NX') then
    -- Budgets this job reserved against: release the reservation, add the actual cost.
    for i = 8, #KEYS do
      redis.call('HINCRBY', KEYS[i], 'reserved_nusd', -tonumber(ARGV[16]))
      spent[#spent + 1] = redis.call('HINCRBY', KEYS[i], 'spent_nusd', ARGV[5])
    end
    local p = ARGV[4]
    redis.call('HINCRBY', KEYS[3], p .. 'jobs', 1)
    redis.call('HINCRBY', KEYS[3], p .. 'cost_nusd', ARGV[5])
    redis.call('HINCRBY', KEYS[3], p .. 'baseline_nusd', ARGV[6])
    redis.call('HINCRBY', KEYS[3], p .. 'input_tokens', ARGV[7])
    redis.call('HINCRBY', KEYS[3], p .. 'output_tokens', ARGV[8])
    redis.call('HINCRBY', KEYS[3], p .. 'cache_hits', ARGV[9])
    redis.call('HINCRBY', KEYS[3], p .. 'errors', ARGV[10])
    redis.call('SADD', KEYS[4], ARGV[11])
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[15], '*', 'entry', ARGV[3])
  end
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  if ARGV[12] ~= '' then
    redis.call('SET', KEYS[6], ARGV[12], 'EX', ARGV[13])
  end
end
if ARGV[14] ~= '' and redis.call('GET', KEYS[7]) == ARGV[14] then
  redis.call('DEL', KEYS[7])
end
return {existing or false, unpack(spent)}
"""


@dataclass(frozen=True)
class Recorded:
    existing: bytes | None
    spent_usd: tuple[float, ...] = ()


@dataclass(frozen=True)
class CacheFill:
    key: str
    value: str
    ttl_s: int


def utc_day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def nano(usd: float) -> int:
    return round(usd * NANO)


def entry_json(result: JobResult, *, ts: float) -> str:
    return json.dumps(
        {
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
            "ts": round(ts, 3),
            "day": utc_day(ts),
        },
        separators=(",", ":"),
    )


class Ledger:
    def __init__(self, redis: Redis, keys: RedisKeys, *, result_ttl_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.result_ttl_s = result_ttl_s
        self._script = redis.register_script(_RECORD)

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
    ) -> Recorded:
        """Record the job once. ``existing`` is the previously stored result when the job was
        already recorded (the caller then replays that one); ``spent_usd`` is each budget's spend
        after settling this job (empty on a replay). ``result_json`` is the result already
        serialised by the caller (the reply body), so it is not serialised twice."""
        day = utc_day(ts)
        field_prefix = f"{result.tenant or 'default'}|{result.provider or '-'}|{result.model or '-'}|"
        keys = [
            self.keys.result(result.job_id),
            self.keys.ledger_entry(result.job_id),
            self.keys.ledger_agg(day),
            self.keys.ledger_days,
            self.keys.ledger_stream,
            self.keys.cache(cache.key) if cache else self.keys.cache("-"),
            self.keys.inflight(lease_key) if lease_key else self.keys.inflight("-"),
            *(hold.key for hold in budgets),
        ]
        args: list[str | int | float] = [
            result_json or result.model_dump_json(),
            self.result_ttl_s,
            entry_json(result, ts=ts),
            field_prefix,
            nano(result.cost_usd),
            nano(result.baseline_cost_usd),
            result.usage.input_tokens,
            result.usage.output_tokens,
            1 if result.cache != "miss" else 0,
            1 if result.status == "error" else 0,
            day,
            cache.value if cache else "",
            cache.ttl_s if cache else 0,
            result.job_id if lease_key else "",
            STREAM_MAXLEN,
            nano(reserved_usd),
        ]
        reply = await self._script(keys=keys, args=args)
        existing = reply[0] if reply else None
        return Recorded(
            existing=existing.encode() if isinstance(existing, str) else existing,
            spent_usd=tuple(int(v) / NANO for v in reply[1:]),
        )
