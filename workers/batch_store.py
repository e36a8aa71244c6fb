"""The batch lane's durable state in Redis: every job of a provider batch is here before its intake message
is acked, and every batch's provider handle as soon as the submit returns, so a batch worker killed at any
point loses nothing and a restarted one (or another replica) resumes what it held.

A batch moves ``open`` (taking jobs) -> ``sealed`` (full, or lingered long enough) -> ``submitting`` (the
create call is out; on resume the provider is asked for the batch by its idempotency key before creating
it again) -> ``submitted`` (polled) and is deleted once every job is handed on. A worker holds a batch by
a claim that it renews; a claim not renewed in time (its worker died) may be taken by any worker.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis

from farebox.constants import JobRecord, RedisKeys
from farebox.stages.lua import Layout, NamedScript

# abandoned: given up after failing too often; its remaining jobs go to the sync lane (whoever holds it).
BatchState = Literal["open", "sealed", "submitting", "submitted", "abandoned"]
MARKER_TTL_S = 3 * 86_400  # longer than a batch's 24 h window plus its resubmissions

_ADD_LAYOUT = Layout(
    keys=("marker_key", "jobs_key", "meta_key", "live_key"),
    args=(
        "custom_id",
        "envelope_json",
        "batch",
        "fresh",  # '1': the caller made this batch id and it may be created; else it must exist and be open
        "model",
        "now",
        "owner",
        "claim_until",
        "marker_ttl_s",
        "max_requests",
        "max_bytes",
    ),
)
# -1: the batch no longer takes jobs (start another); 0: the job is in a live batch already; 1: added.
_ADD = """
local state = redis.call('HGET', meta_key, 'state')
if (state and state ~= 'open') or (not state and fresh ~= '1') then return {-1, 0, 0} end
local before = redis.call('GET', marker_key)
if before and redis.call('SISMEMBER', live_key, before) == 1 then return {0, 0, 0} end
local count = tonumber(redis.call('HGET', meta_key, 'count') or '0')
local size = tonumber(redis.call('HGET', meta_key, 'bytes') or '0')
if count > 0 and (count + 1 > tonumber(max_requests) or size + string.len(envelope_json) > tonumber(max_bytes)) then
  redis.call('HSET', meta_key, 'full', '1')  -- the loop seals it now, not after its linger
  return {-1, 0, 0}
end
redis.call('SET', marker_key, batch, 'EX', marker_ttl_s)
redis.call('HSET', jobs_key, custom_id, envelope_json)
if not state then
  redis.call('HSET', meta_key, 'state', 'open', 'model', model, 'created_at', now, 'owner', owner,
             'claim_until', claim_until)
  redis.call('SADD', live_key, batch)
end
local n = redis.call('HINCRBY', meta_key, 'count', 1)
local total = redis.call('HINCRBY', meta_key, 'bytes', string.len(envelope_json))
return {1, n, total}
"""

_CLAIM_LAYOUT = Layout(keys=("meta_key",), args=("claimant", "now", "claim_until"))
# Renew our claim, or take one its owner let lapse; 0 when the batch is gone or another worker holds it.
_CLAIM = """
if redis.call('EXISTS', meta_key) == 0 then return 0 end
local held_by = redis.call('HGET', meta_key, 'owner')
local held_until = tonumber(redis.call('HGET', meta_key, 'claim_until') or '0')
if held_by ~= claimant and held_until >= tonumber(now) then return 0 end
redis.call('HSET', meta_key, 'owner', claimant, 'claim_until', claim_until)
return 1
"""

_MOVE_LAYOUT = Layout(keys=("meta_key",), args=("owner", "expected", "state"), arg_tail="fields")
# A state change by the batch's owner only, from the state it last saw: a worker whose claim lapsed while it
# was busy cannot overwrite what the worker that took over has done since.
_MOVE = """
if redis.call('HGET', meta_key, 'owner') ~= owner or redis.call('HGET', meta_key, 'state') ~= expected then
  return 0
end
redis.call('HSET', meta_key, 'state', state)
if #fields > 0 then redis.call('HSET', meta_key, unpack(fields)) end
return 1
"""

_OWNED_LAYOUT = Layout(keys=("meta_key", "jobs_key", "live_key"), args=("owner", "op", "batch"), arg_tail="items")
# What only the batch's owner may do: write fields (op 'set'), drop handed-on jobs ('drop'), finish ('finish').
# 0 when another worker holds the batch now (or it is gone): the caller stops and leaves it to that worker.
_OWNED = """
if redis.call('HGET', meta_key, 'owner') ~= owner then return 0 end
if op == 'set' then
  redis.call('HSET', meta_key, unpack(items))
elseif op == 'drop' then
  redis.call('HDEL', jobs_key, unpack(items))
else
  redis.call('DEL', jobs_key, meta_key)
  redis.call('SREM', live_key, batch)
end
return 1
"""

_HOLD_LAYOUT = Layout(keys=("lease_key",), args=("owner", "ttl_s"))
_HOLD = """
if redis.call('GET', lease_key) == owner then return redis.call('EXPIRE', lease_key, ttl_s) end
return 0
"""


def custom_id_of(record: JobRecord) -> str:
    """A job's id in a provider batch: fits every provider's rule (``[A-Za-z0-9_-]{1,64}``) whatever the
    job_id holds, and names the job's record (tenant and job_id) without showing either."""
    return hashlib.blake2b(record.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class Added:
    outcome: Literal["added", "duplicate", "closed"]
    count: int = 0
    size: int = 0


class BatchStore:
    """One provider's batch records."""

    def __init__(self, redis: Redis, keys: RedisKeys, provider: str) -> None:
        self.redis = redis
        self.keys = keys
        self.provider = provider
        self._add = NamedScript(redis, _ADD_LAYOUT, _ADD, "batch add")
        self._claim = NamedScript(redis, _CLAIM_LAYOUT, _CLAIM, "batch claim")
        self._move = NamedScript(redis, _MOVE_LAYOUT, _MOVE, "batch move")
        self._hold = NamedScript(redis, _HOLD_LAYOUT, _HOLD, "lease hold")
        self._owned = NamedScript(redis, _OWNED_LAYOUT, _OWNED, "batch owned")

    def _meta(self, batch: str) -> str:
        return self.keys.batch_meta(self.provider, batch)

    def _jobs(self, batch: str) -> str:
        return self.keys.batch_jobs(self.provider, batch)

    async def add(
        self,
        batch: str,
        model: str,
        custom_id: str,
        envelope_json: str,
        *,
        fresh: bool,
        now: float,
        owner: str,
        claim_s: float,
        limits: tuple[int, int],
    ) -> Added:
        reply = await self._add(
            keys={
                "marker_key": self.keys.batch_job(self.provider, custom_id),
                "jobs_key": self._jobs(batch),
                "meta_key": self._meta(batch),
                "live_key": self.keys.batch_live(self.provider),
            },
            args={
                "custom_id": custom_id,
                "envelope_json": envelope_json,
                "batch": batch,
                "fresh": "1" if fresh else "0",
                "model": model,
                "now": repr(now),
                "owner": owner,
                "claim_until": repr(now + claim_s),
                "marker_ttl_s": MARKER_TTL_S,
                "max_requests": limits[0],
                "max_bytes": limits[1],
            },
        )
        code, count, size = (int(v) for v in reply)
        outcome: Literal["added", "duplicate", "closed"] = {1: "added", 0: "duplicate"}.get(code, "closed")  # type: ignore[assignment]
        return Added(outcome, count, size)

    async def hold_lease(self, coalesce_key: str, record: JobRecord) -> None:
        """Keep the job's coalescing lease (if it leads identical jobs) for as long as a batch may take: the
        waiters must not take over after the dedup stage's few minutes and send the same prompt again."""
        await self._hold(
            keys={"lease_key": self.keys.inflight(coalesce_key)}, args={"owner": record, "ttl_s": MARKER_TTL_S}
        )

    async def live(self) -> list[str]:
        return sorted(
            v.decode() if isinstance(v, bytes) else str(v)
            for v in await self.redis.smembers(self.keys.batch_live(self.provider))
        )

    async def meta(self, batch: str) -> dict[str, str]:
        raw = await self.redis.hgetall(self._meta(batch))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def claim(self, batch: str, owner: str, *, now: float, claim_s: float) -> bool:
        args = {"claimant": owner, "now": repr(now), "claim_until": repr(now + claim_s)}
        return bool(await self._claim(keys={"meta_key": self._meta(batch)}, args=args))

    async def move(self, batch: str, owner: str, expected: BatchState, state: BatchState, **fields: str) -> bool:
        flat = [item for pair in fields.items() for item in pair]
        args = {"owner": owner, "expected": expected, "state": state}
        return bool(await self._move(keys={"meta_key": self._meta(batch)}, args=args, arg_tail=flat))

    async def _as_owner(self, batch: str, owner: str, op: str, items: Sequence[str] = ()) -> bool:
        keys = {
            "meta_key": self._meta(batch),
            "jobs_key": self._jobs(batch),
            "live_key": self.keys.batch_live(self.provider),
        }
        return bool(await self._owned(keys=keys, args={"owner": owner, "op": op, "batch": batch}, arg_tail=list(items)))

    async def update(self, batch: str, owner: str, fields: Mapping[str, str]) -> bool:
        return await self._as_owner(batch, owner, "set", [item for pair in fields.items() for item in pair])

    async def jobs(self, batch: str) -> dict[str, str]:
        raw = await self.redis.hgetall(self._jobs(batch))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def handed_on(self, batch: str, owner: str, custom_ids: Sequence[str]) -> bool:
        """Jobs published onward: a resumed worker does not hand them on again."""
        return not custom_ids or await self._as_owner(batch, owner, "drop", custom_ids)

    async def finish(self, batch: str, owner: str) -> bool:
        return await self._as_owner(batch, owner, "finish")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class LaneProgress:
    """What the batch lane holds now, for a progress line (``farebox submit --lane batch``)."""

    queued: int = 0  # jobs in batches not submitted yet
    submitted: int = 0  # jobs in submitted batches
    batch_ids: tuple[str, ...] = ()  # the providers' ids of the submitted batches

    def describe(self) -> str:
        if not (self.queued or self.submitted):
            return ""
        shown = ", ".join(self.batch_ids[:2]) + (f" +{len(self.batch_ids) - 2}" if len(self.batch_ids) > 2 else "")
        submitted = f", {self.submitted} submitted as batch {shown}" if self.submitted else ""
        return f"batch lane: {self.queued} queued for a batch{submitted}"


async def lane_progress(redis: Redis, keys: RedisKeys, providers: Sequence[str]) -> LaneProgress:
    queued = submitted = 0
    ids: list[str] = []
    for provider in providers:
        store = BatchStore(redis, keys, provider)
        for batch in await store.live():
            meta = await store.meta(batch)
            waiting = await redis.hlen(keys.batch_jobs(provider, batch))
            if meta.get("state") == "submitted" and "handle" in meta:
                submitted += waiting
                ids.append(json.loads(meta["handle"]).get("batch_id", batch))
            else:
                queued += waiting
    return LaneProgress(queued, submitted, tuple(ids))
