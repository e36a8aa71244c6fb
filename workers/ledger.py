"""The ledger: one entry per job, its aggregates counted once, the stored result, the cache fill and the
release of the job's coalescing lease.

The keys belong to different owners (farebox/constants.py), so on a Redis Cluster they sit in different slots
and no one script may touch them all. The exactly-once part is one script in the job's slot: ``SET NX`` on the
entry key makes a redelivered account message unable to record twice, and the stored result (with a TTL) lets
the dedup stage replay a job_id that is already done. The rest is then folded in, idempotently, by scripts in
their own slots, issued together (one round trip): the aggregates (``{ledger}``: a per-day marker hash says
which records are folded in, so a record is counted once), the budgets (``{b:<tenant>}``: the job's
reservation, marked ``settled``, says it is settled) and the cache fill with the lease release (``{c:<key>}``).
Every delivery folds what its entry says, while the entry is younger than the fold window (the result TTL): so
a crash between the record and the folds is repaired by the redelivery, never counted twice, and a job_id sent
again after the window (its entry still there) is not counted again. A redelivery after the window is not
folded (an aggregate short of one job, never one counted twice); the fold markers outlive the window.
Money is aggregated in integer nano-dollars so totals add up exactly.

A job answered through a provider batch (``result.route.lane == "batch"``) also adds to the ``batch_*`` fields
of its aggregate, among them ``batch_sync_nusd``: what the same usage would have cost on the same model
synchronously, so ``farebox report`` can show the batch lane's own saving. The sync lane is the totals minus
these, so the aggregates of before the batch lane read as all sync.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.crc import key_slot

from farebox.constants import NANO, JobRecord, RedisKeys, job_record
from farebox.schemas import BudgetHold, JobResult
from farebox.stages.ledger_entry import ENTRY_VERSION, day_expiry, entry_json, nano
from farebox.stages.lua import Layout, NamedScript, Scalar

log = logging.getLogger("farebox.ledger")

STREAM_MAXLEN = 1_000_000
FOLD_MARGIN_S = 3600  # the fold markers outlive the fold window by this much (clock skew between hosts)
# A settled mark lives as long as a budget period's keys (farebox/stages/budgets.py, PERIOD_TTL_S), and never less
# than the fold window: a copy of the job settles while its entry is young, and must still find the mark.
SETTLED_TTL_S = 40 * 86_400

# The release of a coalescing lease this job holds, ending both release scripts below (the record's, for a job's
# own lease; the cache fill's, for a shared entry's). It wakes the lease's waiters, if one said it waits (the dedup
# decide scripts set the flag) and the lease was this job's or is gone (expired): one PUBLISH, atomic with the
# release. Another job's lease is left alone, and so are its waiters.
_RELEASE = """
if lease_owner ~= '' then
  local lease = redis.call('GET', lease_key)
  if lease == lease_owner then
    redis.call('DEL', lease_key)
  end
  if (lease == lease_owner or not lease) and redis.call('DEL', waiters_key) == 1 then
    redis.pcall('PUBLISH', wake_channel, lease_key)  -- a hint: an ACL without the channel must not fail the write
  end
end
"""

# The exactly-once part, in the job's slot. ``fresh``: this call wrote the entry; else the entry already there
# (its folds are repeated, idempotently, while it is young). A job's own coalescing lease (not a shared cache
# entry's) sits here too and is released with the result stored, so a copy never leads in between.
_RECORD_LAYOUT = Layout(
    keys=("result_key", "entry_key", "prompt_key", "lease_key", "waiters_key"),
    args=(
        "result_json",
        "result_ttl_s",
        "entry_json",
        "entry_ttl_s",
        "prompt_json",  # the messages as sent, kept for `farebox feedback export`; '' when not kept
        "prompt_ttl_s",
        "lease_owner",  # the job record when the job holds its own lease, else ''
        "wake_channel",  # where a released lease's waiters are woken (farebox/stages/wake.py)
    ),
)
_RECORD = (
    """
local existing = redis.call('GET', result_key)
local fresh = 0
local entry = false
if not existing and redis.call('SET', entry_key, entry_json, 'NX', 'EX', entry_ttl_s) then
  fresh = 1
  if prompt_json ~= '' then
    redis.call('SET', prompt_key, prompt_json, 'EX', prompt_ttl_s)
  end
else
  entry = redis.call('GET', entry_key)
end
if not existing then
  redis.call('SET', result_key, result_json, 'EX', result_ttl_s)
end
"""
    + _RELEASE
    + """
return {existing or false, fresh, entry}
"""
)

# The aggregates, in the ledger's slot: once per record (the marker hash of the entry's day). Also the end of a
# cache hit recorded in one round trip (farebox/stages/one_trip.py).
FOLD_LAYOUT = Layout(
    keys=("folded_key", "day_key", "days_key", "stream_key", "arms_key"),
    args=(
        "record",
        "folded_expires_at",
        "entry_json",
        "field_prefix",  # "tenant|provider|model|" of this job's aggregate fields
        "cost_nusd",
        "baseline_nusd",
        "input_tokens",
        "output_tokens",
        "cache_hit",  # 1 or 0
        "is_error",  # 1 or 0
        "day",
        "day_expires_at",  # unix time when this day's aggregates expire
        "stream_maxlen",
        "arm_prefix",  # "experiment|arm|" when an experiment arm routed the job, else ''
        "evaluation_nusd",  # the cost again when it is evaluation spend (shadow grading), else 0
        "is_batch",  # 1 when the job was answered through a provider batch, else 0
        "sync_nusd",  # a batch job's cost at the same model's sync price
    ),
)
FOLD = """
if redis.call('HSETNX', folded_key, record, 1) == 0 then
  return 0
end
redis.call('EXPIREAT', folded_key, folded_expires_at)
local p = field_prefix
redis.call('HINCRBY', day_key, p .. 'jobs', 1)
redis.call('HINCRBY', day_key, p .. 'cost_nusd', cost_nusd)
redis.call('HINCRBY', day_key, p .. 'baseline_nusd', baseline_nusd)
redis.call('HINCRBY', day_key, p .. 'input_tokens', input_tokens)
redis.call('HINCRBY', day_key, p .. 'output_tokens', output_tokens)
redis.call('HINCRBY', day_key, p .. 'cache_hits', cache_hit)
redis.call('HINCRBY', day_key, p .. 'errors', is_error)
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
return 1
"""

# The budgets the job reserved against, in its tenant's slot: release what the reservation key says was
# reserved (the route stage's estimate; nothing when its reserve never landed) and add the actual cost, once (the
# key, marked 'settled', says so). Returns each budget's spend after it. Whatever a caller believes it reserved
# is not trusted: a second copy of the job, which reserved nothing, must not release the first copy's estimate.
_SETTLE_LAYOUT = Layout(keys=("reservation_key",), key_tail="budget_keys", args=("cost_nusd", "settled_ttl_s"))
_SETTLE = """
local held = redis.call('GET', reservation_key)
local settled = held == 'settled'
local reserved = tonumber(held) or 0
local spent = {}
for _, budget_key in ipairs(budget_keys) do
  if settled then
    spent[#spent + 1] = tonumber(redis.call('HGET', budget_key, 'spent_nusd') or '0')
  else
    if reserved ~= 0 then
      redis.call('HINCRBY', budget_key, 'reserved_nusd', -reserved)
    end
    spent[#spent + 1] = redis.call('HINCRBY', budget_key, 'spent_nusd', cost_nusd)
  end
end
if not settled then
  redis.call('SET', reservation_key, 'settled', 'EX', settled_ttl_s)
end
return spent
"""

# The cache fill and the release of a shared cache entry's lease, in the entry's slot, together: a waiter
# finds the answer the moment the lease is gone (and its waiters are woken: _RELEASE).
_FILL_LAYOUT = Layout(
    keys=("cache_key", "lease_key", "waiters_key"), args=("cache_value", "cache_ttl_s", "lease_owner", "wake_channel")
)
_FILL = (
    """
if cache_value ~= '' then
  redis.call('SET', cache_key, cache_value, 'EX', cache_ttl_s)
end
"""
    + _RELEASE
    + """
return 1
"""
)


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


class Ledger:
    def __init__(self, redis: Redis, keys: RedisKeys, *, result_ttl_s: int, entry_ttl_s: int, days_kept: int) -> None:
        self.redis = redis
        self.keys = keys
        self.result_ttl_s = result_ttl_s
        self.entry_ttl_s = entry_ttl_s
        self.days_kept = days_kept
        self.fold_window_s = result_ttl_s  # as long as a job_id is replayed from its stored result
        self.settled_ttl_s = max(SETTLED_TTL_S, self.fold_window_s + FOLD_MARGIN_S)
        self._record = NamedScript(redis, _RECORD_LAYOUT, _RECORD, "ledger record")
        self._fold = NamedScript(redis, FOLD_LAYOUT, FOLD, "ledger fold")
        self._settle = NamedScript(redis, _SETTLE_LAYOUT, _SETTLE, "budget settle")
        self._fill = NamedScript(redis, _FILL_LAYOUT, _FILL, "cache fill")

    async def record(
        self,
        result: JobResult,
        *,
        ts: float,
        cache: CacheFill | None,
        lease_key: str | None,
        budgets: Sequence[BudgetHold] = (),
        result_json: str | None = None,
        prompt: KeptPrompt | None = None,
        evaluation: str | None = None,
        sync_cost_usd: float | None = None,
    ) -> Recorded:
        """Record the job once. ``existing`` is the previously stored result when the job was
        already recorded (the caller then replays that one); ``spent_usd`` is each budget's spend
        after settling this job (empty on a replay). ``result_json`` is the result already
        serialised by the caller (the reply body), so it is not serialised twice. ``sync_cost_usd``:
        a batch job's cost at its model's sync price (its own cost when not given). ``lease_key``: the
        job's coalescing key, whose lease is released when the job holds it."""
        record = job_record(result.tenant or "default", result.job_id)
        own_lease = lease_key is not None and lease_key.startswith("job:")
        entry = entry_json(result, ts=ts, evaluation=evaluation)
        args: dict[str, Scalar] = {
            "result_json": result_json or result.model_dump_json(),
            "result_ttl_s": self.result_ttl_s,
            "entry_json": entry,
            "entry_ttl_s": self.entry_ttl_s,
            "prompt_json": prompt.messages_json if prompt else "",
            "prompt_ttl_s": prompt.ttl_s if prompt else 0,
            "lease_owner": record if own_lease else "",
            "wake_channel": self.keys.wake_channel,
        }
        keys = {
            "result_key": self.keys.result(record),
            "entry_key": self.keys.ledger_entry(record),
            "prompt_key": self.keys.prompt(record),
            "lease_key": self.keys.inflight(f"job:{record}"),
            "waiters_key": self.keys.waiters(f"job:{record}"),
        }
        existing, fresh, stored = await self._record(keys=keys, args=args)
        folds: list[Awaitable[Any]] = []
        # A job served from the cache took no lease (the decide script answers before it takes one).
        holds_lease = lease_key is not None and not own_lease and result.cache == "miss"
        if cache is not None or holds_lease:
            folds.append(self._fill_and_release(record, cache, lease_key if holds_lease else None))
        young = fresh or (stored is not None and self._young(stored, ts))
        if young:
            folded = json.loads(entry if fresh else stored)
            folds.append(self._fold_in(record, folded, entry if fresh else stored, sync_cost_usd))
            budgets = self._settleable(record, budgets)
            if budgets:
                folds.append(self._settle_budgets(record, budgets, folded))
        replies = await asyncio.gather(*folds)
        spent = replies[-1] if young and budgets else []
        return Recorded(
            existing=existing.encode() if isinstance(existing, str) else existing or None,
            spent_usd=tuple(int(v) / NANO for v in spent),
        )

    def _settleable(self, record: JobRecord, budgets: Sequence[BudgetHold]) -> Sequence[BudgetHold]:
        """The holds whose budget sits with the job's reservation: all of them, but for a job reserved by a
        farebox of before the cluster key names (in flight across an upgrade that did not drain its queues),
        whose holds name the old keys: those are left unsettled, with a warning, rather than fail the job."""
        slot = key_slot(self.keys.reservation(record).encode())
        kept = [hold for hold in budgets if key_slot(hold.key.encode()) == slot]
        if len(kept) < len(budgets):
            log.warning("ledger: job %s reserved against budget keys of an older farebox; not settled", record)
        return kept

    def _young(self, stored: bytes | str, ts: float) -> bool:
        """An entry recorded less than the fold window ago: its folds may not have happened yet. An entry of a
        farebox before the split (no ``v``, moved by ``farebox keys upgrade``) had them in its own script."""
        entry = json.loads(stored)
        return entry.get("v") == ENTRY_VERSION and ts - float(entry["ts"]) < self.fold_window_s

    def _fold_in(self, record: JobRecord, entry: dict[str, Any], raw: str | bytes, sync_cost_usd: float | None) -> Any:
        """The fold of ``entry`` (as stored: a redelivery folds what was recorded, on the day it was)."""
        keys, args = self.fold_call(record, entry, raw, sync_cost_usd)
        return self._fold(keys=keys, args=args)

    def fold_call(
        self, record: JobRecord, entry: dict[str, Any], raw: str | bytes, sync_cost_usd: float | None
    ) -> tuple[dict[str, str], dict[str, Scalar]]:
        """The fold script's keys and arguments for ``entry`` (``raw``: its JSON as recorded)."""
        day, ts = str(entry["day"]), float(entry["ts"])
        cost = nano(float(entry["cost_usd"]))
        args: dict[str, Scalar] = {
            "record": record,
            "folded_expires_at": day_expiry(ts, 0) + self.fold_window_s + FOLD_MARGIN_S,
            "entry_json": raw.decode() if isinstance(raw, bytes) else raw,
            "field_prefix": f"{entry['tenant']}|{entry['provider'] or '-'}|{entry['model'] or '-'}|",
            "cost_nusd": cost,
            "baseline_nusd": nano(float(entry["baseline_cost_usd"])),
            "input_tokens": int(entry["input_tokens"]),
            "output_tokens": int(entry["output_tokens"]),
            "cache_hit": 1 if entry["cache"] != "miss" else 0,
            "is_error": 1 if entry["status"] == "error" else 0,
            "day": day,
            "day_expires_at": day_expiry(ts, self.days_kept),
            "stream_maxlen": STREAM_MAXLEN,
            "arm_prefix": f"{entry['experiment']}|{entry['arm']}|" if "arm" in entry else "",
            "evaluation_nusd": cost if entry.get("evaluation") else 0,
            "is_batch": 1 if entry.get("lane") == "batch" else 0,
            "sync_nusd": cost if sync_cost_usd is None else nano(sync_cost_usd),
        }
        keys = {
            "folded_key": self.keys.ledger_folded(day),
            "day_key": self.keys.ledger_agg(day),
            "days_key": self.keys.ledger_days,
            "stream_key": self.keys.ledger_stream,
            "arms_key": self.keys.ledger_arms(day),
        }
        return keys, args

    def _settle_budgets(self, record: JobRecord, budgets: Sequence[BudgetHold], entry: dict[str, Any]) -> Any:
        return self._settle(
            keys={"reservation_key": self.keys.reservation(record)},
            key_tail=[hold.key for hold in budgets],
            args={
                "cost_nusd": nano(float(entry["cost_usd"])),
                "settled_ttl_s": self.settled_ttl_s,
            },
        )

    def _fill_and_release(self, record: JobRecord, cache: CacheFill | None, lease_key: str | None) -> Any:
        """Fill the cache and release a shared entry's lease (in the entry's slot), once the result is stored."""
        base = cache.key if cache is not None else (lease_key or "-").partition("|")[0]
        if cache is not None and lease_key is not None and lease_key.partition("|")[0] != cache.key:
            # Not one entry's (no key of today's makes it so): two calls, each in its own slot.
            return asyncio.gather(
                self._fill_and_release(record, cache, None), self._fill_and_release(record, None, lease_key)
            )
        args: dict[str, Scalar] = {
            "cache_value": cache.value if cache else "",
            "cache_ttl_s": cache.ttl_s if cache else 0,
            "lease_owner": record if lease_key else "",
            "wake_channel": self.keys.wake_channel,
        }
        lease = lease_key or base
        keys = {
            "cache_key": self.keys.cache(base),
            "lease_key": self.keys.inflight(lease),
            "waiters_key": self.keys.waiters(lease),
        }
        return self._fill(keys=keys, args=args)
