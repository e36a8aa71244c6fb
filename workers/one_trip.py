"""A cache hit in one Redis round trip, where Redis is one server (alone, or the master behind a Sentinel).

On a Redis Cluster a hit's keys sit in three slots (the job's, the cache entry's, the ledger's), so its lookup,
its exactly-once record and its fold into the aggregates are three round trips (dedup.py, ledger.py). One server
runs one script over them all: the lookup and, when the entry holds the answer the dedup process expected, the
record and the fold, atomically. The record needs the result, which is built from the answer: so the process
remembers the answers it found lately (``hit_memo_entries`` cache keys and ``hit_memo_bytes`` of their JSON, the
least recently used go first), builds
the result before it asks, and the script records it only when the entry holds that very answer (its SHA-1).
A key's first hit in a process, or one whose entry changed, gets the entry back instead; it is remembered, and the
hit is recorded and folded by a second script: two round trips.

The guarantees are the ledger's: one entry, written with the result stored, folded once (the fold marker); the
fold runs in the script that wrote the entry, so it never folds another copy's. What these scripts leave out (an
entry there already, a job_id answered meanwhile, Redis away) is recorded the three-step way with the result as
prepared, so a write that did happen is found and its very result replayed. A hit never goes on to the route
stage once its script may have run: with Redis away at a remembered key's lookup, the hit is answered from memory
and recorded once Redis answers.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from farebox.constants import as_text, job_record
from farebox.errors import REDIS_DOWN
from farebox.schemas import Envelope, Outcome
from farebox.settings import Settings
from farebox.stages import ledger_scripts
from farebox.stages.account import AccountStage, Prepared
from farebox.stages.ledger_entry import entry_fields, entry_text
from farebox.stages.lua import Layout, NamedScript, Scalar, one_server
from farebox.stages.stage import Handled

# Taking (or finding) a coalescing lease, the end of dedup's decide scripts and of the one-trip hit's. A job that
# will be held while it waits (``wake``) flags the lease, and its release wakes it (farebox/stages/wake.py).
LEASE = """
if redis.call('SET', lease_key, job_id, 'NX', 'EX', lease_ttl_s) then
  return {'lead'}
end
local state = 'wait'
if redis.call('GET', lease_key) == job_id then
  state = 'own'
end
if wake == '1' then
  redis.call('SET', waiters_key, 1, 'EX', lease_ttl_s)
end
return {state}
"""

# The record of a hit whose job has no stored result, then its fold; ``entry``: an entry is there already (a
# copy's, or one whose result expired), which the ledger's own record script sorts out.
_RECORD_AND_FOLD = (
    """
local function fold()
"""
    + ledger_scripts.FOLD
    + """
end
if not redis.call('SET', entry_key, entry_json, 'NX', 'EX', entry_ttl_s) then
  return {'entry'}
end
redis.call('SET', result_key, result_json, 'EX', result_ttl_s)
fold()
return {'served'}
"""
)
_RECORDS = ("result_json", "result_ttl_s", "entry_ttl_s")

# Dedup's decide for a job that shares a cache entry, with the hit recorded: answered job_id? cached answer (the
# expected one: recorded and folded; another: returned)? else the entry's lease. ``job_id`` is the record.
_SERVE_LAYOUT = Layout(
    keys=("result_key", "cache_key", "lease_key", "waiters_key", "entry_key", *ledger_scripts.FOLD_LAYOUT.keys),
    args=("lease_ttl_s", "wake", "answer_sha", *_RECORDS, *ledger_scripts.FOLD_LAYOUT.args),
)
_SERVE = (
    """
local job_id = record
if redis.call('EXISTS', result_key) == 1 then
  return {'answered'}
end
local cached = redis.call('GET', cache_key)
if cached then
  if redis.sha1hex(cached) ~= answer_sha then
    return {'cached', cached}
  end
"""
    + _RECORD_AND_FOLD
    + """
end
"""
    + LEASE
)

# The second trip of a hit whose answer the lookup returned: answered job_id meanwhile? else record and fold.
_RECORD_SERVED_LAYOUT = Layout(
    keys=("result_key", "entry_key", *ledger_scripts.FOLD_LAYOUT.keys),
    args=(*_RECORDS, *ledger_scripts.FOLD_LAYOUT.args),
)
_RECORD_SERVED = (
    """
if redis.call('EXISTS', result_key) == 1 then
  return {'answered'}
end
"""
    + _RECORD_AND_FOLD
)


def one_trip_hits(settings: Settings, redis: Redis, account: AccountStage) -> OneTripHits | None:
    """The one-trip path where Redis is one server; None on a Redis Cluster, whose slots keep the three steps."""
    if not one_server(redis):
        return None
    return OneTripHits(settings, redis, account)


class OneTripHits:
    """Cache hits looked up and recorded together (the module's docstring), with the answers lately found."""

    def __init__(self, settings: Settings, redis: Redis, account: AccountStage) -> None:
        self.keys = settings.keys
        self.account = account
        self.ledger = account.recorder.ledger
        self.capacity, self.byte_capacity = settings.hit_memo_entries, settings.hit_memo_bytes
        self.answers: OrderedDict[str, tuple[str, Outcome]] = OrderedDict()  # cache key -> (SHA-1, answer)
        self.sizes: dict[str, int] = {}  # cache key -> its entry's length: the memo's bound in bytes
        self.held_bytes = 0
        self._serve = NamedScript(redis, _SERVE_LAYOUT, _SERVE, "one-trip hit", one_server=True)
        self._record = NamedScript(redis, _RECORD_SERVED_LAYOUT, _RECORD_SERVED, "one-trip record", one_server=True)

    def ahead(self, env: Envelope, served: Callable[[Envelope, Outcome], Envelope]) -> Prepared | None:
        """``env`` answered by the entry's answer this process found last (``served`` makes the hit of it),
        prepared for the one-trip script; None when no answer is remembered or the hit is not one it records."""
        assert env.cache_key is not None
        remembered = self.answers.get(env.cache_key)
        if remembered is None:
            return None
        self.answers.move_to_end(env.cache_key)
        ready = self.account.prepare(served(env, remembered[1]))
        return ready if _recordable(ready) else None

    async def serve(self, env: Envelope, ready: Prepared, leases: dict[str, str], wake: bool) -> tuple[str, list[Any]]:
        """Dedup's decide for ``env`` with ``ready`` recorded when the entry holds its answer: ``served`` (with
        ``ready``), ``unrecorded`` (with ``ready``, to record the ledger's way: an entry was there, or Redis is
        away, when the script may have run all the same), ``answered``, ``cached`` (with another answer), or the
        lease's lead, own or wait."""
        assert env.cache_key is not None
        keys, args = self._calls(ready)
        args.update(
            lease_ttl_s=self.account.settings.leader_lease_s, wake=int(wake), answer_sha=self.answers[env.cache_key][0]
        )
        try:
            state, *value = await self._serve(
                keys={**keys, "cache_key": self.keys.cache(env.cache_key), **leases}, args=args
            )
        except REDIS_DOWN:
            # Never on to the route stage: the hit may be recorded already (a reply lost, a write no replica
            # confirmed). Answered from memory, and recorded once Redis answers (a repeat finds it stored).
            return "unrecorded", [ready]
        state = as_text(state)
        if state in ("served", "entry"):
            return "served" if state == "served" else "unrecorded", [ready]
        if state not in ("answered", "cached"):  # no entry any more: a lease taken or found
            self.forget(env.cache_key)
        return state, value

    async def record(self, env: Envelope, raw: bytes) -> Handled:
        """Record and answer ``env``, served the entry's answer ``raw`` the lookup returned (the second trip)."""
        assert env.cache_key is not None
        self.remember(env.cache_key, raw, env.outcome)
        ready = self.account.prepare(env)
        if not _recordable(ready):
            return await self.account.record_prepared(ready)
        keys, args = self._calls(ready)
        try:
            recorded = as_text((await self._record(keys=keys, args=args))[0]) == "served"
        except REDIS_DOWN:
            recorded = False  # the ledger's way: it keeps trying, and a repeat of the write finds the result
        return await self.answer(ready, recorded)

    async def answer(self, ready: Prepared, recorded: bool) -> Handled:
        """``ready``'s replies: recorded by a one-trip script, or else recorded now the ledger's way, its result as
        prepared (a job_id answered meanwhile, an entry already there, Redis away)."""
        if recorded:
            return await self.account.recorded(ready)
        return await self.account.record_prepared(ready)

    def remember(self, cache_key: str, raw: bytes, answer: Outcome | None = None) -> None:
        """Keep the entry's answer ``raw`` (``answer``, parsed) as this key's expected one; the least recently used
        keys go beyond the capacity in keys or in bytes, and an answer larger than the whole memo is not kept."""
        self.forget(cache_key)
        if self.capacity <= 0 or len(raw) > self.byte_capacity:
            return
        parsed = answer if answer is not None else Outcome.model_validate_json(raw)
        self.answers[cache_key] = (hashlib.sha1(raw).hexdigest(), parsed)  # SHA-1: Redis's sha1hex
        self.sizes[cache_key] = len(raw)
        self.held_bytes += len(raw)
        while len(self.answers) > self.capacity or self.held_bytes > self.byte_capacity:
            self.forget(next(iter(self.answers)))

    def clear(self) -> None:
        self.answers.clear()
        self.sizes.clear()
        self.held_bytes = 0

    def forget(self, cache_key: str) -> None:
        if self.answers.pop(cache_key, None) is not None:
            self.held_bytes -= self.sizes.pop(cache_key)

    def _calls(self, ready: Prepared) -> tuple[dict[str, str], dict[str, Scalar]]:
        """The record's and the fold's keys and arguments for ``ready``."""
        result = ready.recording.result
        ts = self.account.recorder.clock()
        record, fields = job_record(result.tenant or "default", result.job_id), entry_fields(result, ts=ts)
        raw = entry_text(fields)
        fold_keys, fold_args = self.ledger.fold_call(record, fields, raw, None)
        keys = {"result_key": self.keys.result(record), "entry_key": self.keys.ledger_entry(record), **fold_keys}
        args: dict[str, Scalar] = {
            "result_json": ready.result_json,
            "result_ttl_s": self.ledger.result_ttl_s,
            "entry_ttl_s": self.ledger.entry_ttl_s,
        }
        return keys, {**args, **fold_args}


def _recordable(ready: Prepared) -> bool:
    """A hit these scripts record in full: nothing to settle, keep, fill or release, and no evaluation spend."""
    rec = ready.recording
    return (
        rec.result.cache != "miss"
        and not rec.budgets
        and rec.prompt is None
        and rec.evaluation is None
        and rec.cache is None
        and rec.sync_cost_usd is None
    )
