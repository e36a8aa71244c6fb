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
On one Redis server (``one_server``: alone, or a Sentinel's master) a fresh record and all that follows it are
one script (ledger_scripts.WHOLE), so there is no gap between them; a record that finds the job recorded goes
the split way. The scripts are in farebox/stages/ledger_scripts.py. Money is aggregated in integer nano-dollars
so totals add up exactly.

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
from typing import Any, NamedTuple

from redis.asyncio import Redis
from redis.crc import key_slot

from farebox.constants import NANO, JobRecord, RedisKeys, job_record
from farebox.schemas import BudgetHold, JobResult
from farebox.stages import ledger_scripts as scripts
from farebox.stages.ledger_entry import ENTRY_VERSION, day_expiry, entry_fields, entry_text, nano
from farebox.stages.lua import NamedScript, Scalar

log = logging.getLogger("farebox.ledger")

STREAM_MAXLEN = 1_000_000
FOLD_MARGIN_S = 3600  # the fold markers outlive the fold window by this much (clock skew between hosts)
# A settled mark lives as long as a budget period's keys (farebox/stages/budgets.py, PERIOD_TTL_S), and never less
# than the fold window: a copy of the job settles while its entry is young, and must still find the mark.
SETTLED_TTL_S = 40 * 86_400


@dataclass(frozen=True)
class Recorded:
    existing: bytes | None
    spent_usd: tuple[float, ...] = ()


class Written(NamedTuple):
    """What the record script did: the job's record and entry JSON, the stored result found (a replay), whether
    this call wrote the entry, and the entry found there when it did not."""

    record: JobRecord
    entry: str
    existing: bytes | str | None
    fresh: int
    stored: bytes | str | None


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
    def __init__(
        self,
        redis: Redis,
        keys: RedisKeys,
        *,
        result_ttl_s: int,
        entry_ttl_s: int,
        days_kept: int,
        one_server: bool = False,
    ) -> None:
        self.redis = redis
        # On one Redis server, a fresh record and all that follows it are one script (ledger_scripts.WHOLE).
        self.one_server = one_server
        self.keys = keys
        self.result_ttl_s = result_ttl_s
        self.entry_ttl_s = entry_ttl_s
        self.days_kept = days_kept
        self.fold_window_s = result_ttl_s  # as long as a job_id is replayed from its stored result
        self.settled_ttl_s = max(SETTLED_TTL_S, self.fold_window_s + FOLD_MARGIN_S)
        self._record = NamedScript(redis, scripts.RECORD_LAYOUT, scripts.RECORD, "ledger record")
        self._fold = NamedScript(redis, scripts.FOLD_LAYOUT, scripts.FOLD, "ledger fold")
        self._settle = NamedScript(redis, scripts.SETTLE_LAYOUT, scripts.SETTLE, "budget settle")
        self._fill = NamedScript(redis, scripts.FILL_LAYOUT, scripts.FILL, "cache fill")
        self._whole = NamedScript(redis, scripts.WHOLE_LAYOUT, scripts.WHOLE, "ledger record, whole", one_server=True)

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
        record, fields, entry, keys, args = self.record_call(result, ts, lease_key, result_json, prompt, evaluation)
        whole = self._whole_call(record, fields, entry, result, cache, lease_key, budgets, sync_cost_usd)
        if whole is None:
            existing, fresh, stored = await self._record(keys=keys, args=args)
        else:
            whole_keys, budget_keys, whole_args = whole
            existing, fresh, stored, *spent = await self._whole(
                keys={**keys, **whole_keys}, key_tail=budget_keys, args={**args, **whole_args}
            )
            if fresh:
                return Recorded(existing=None, spent_usd=tuple(int(v) / NANO for v in spent))
        return await self.follow_ups(
            Written(record, entry, existing, fresh, stored), result, ts, cache, lease_key, budgets, sync_cost_usd
        )

    def record_call(
        self,
        result: JobResult,
        ts: float,
        lease_key: str | None,
        result_json: str | None,
        prompt: KeptPrompt | None,
        evaluation: str | None,
    ) -> tuple[JobRecord, dict[str, Any], str, dict[str, str], dict[str, Scalar]]:
        """The job's record, its entry (fields and JSON), and the record script's keys and arguments."""
        record = job_record(result.tenant or "default", result.job_id)
        own_lease = lease_key is not None and lease_key.startswith("job:")
        fields = entry_fields(result, ts=ts, evaluation=evaluation)
        entry = entry_text(fields)
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
        return record, fields, entry, keys, args

    async def follow_ups(
        self,
        written: Written,
        result: JobResult,
        ts: float,
        cache: CacheFill | None,
        lease_key: str | None,
        budgets: Sequence[BudgetHold],
        sync_cost_usd: float | None,
    ) -> Recorded:
        """After the record script: the folds, issued together (the aggregates and budgets while the entry is
        young, the cache fill and a shared lease's release always)."""
        record, entry, existing, fresh, stored = written
        folds: list[Awaitable[Any]] = []
        shared_lease = _shared_lease(result, lease_key)
        if cache is not None or shared_lease is not None:
            folds.append(self._fill_and_release(record, cache, shared_lease))
        young = fresh or (stored is not None and self._young(stored, ts))
        if young:
            raw = entry if fresh else stored
            assert raw is not None
            folded = json.loads(raw)
            folds.append(self._fold_in(record, folded, raw, sync_cost_usd))
            budgets = self._settleable(record, budgets)
            if budgets:
                folds.append(self._settle_budgets(record, budgets, folded))
        replies = await asyncio.gather(*folds)
        spent = replies[-1] if young and budgets else []
        return Recorded(
            existing=existing.encode() if isinstance(existing, str) else existing or None,
            spent_usd=tuple(int(v) / NANO for v in spent),
        )

    def _whole_call(
        self,
        record: JobRecord,
        fields: dict[str, Any],
        entry: str,
        result: JobResult,
        cache: CacheFill | None,
        lease_key: str | None,
        budgets: Sequence[BudgetHold],
        sync_cost_usd: float | None,
    ) -> tuple[dict[str, str], list[str], dict[str, Scalar]] | None:
        """What ledger_scripts.WHOLE takes beyond the record's keys and arguments: the fill's, the fold's and the
        settle's, for the entry as written fresh; None where Redis is not one server (or the fill is two)."""
        if not self.one_server:
            return None
        fill_lease = _shared_lease(result, lease_key)
        if cache is not None and fill_lease is not None and fill_lease.partition("|")[0] != cache.key:
            return None
        fold_keys, fold_args = self.fold_call(record, fields, entry, sync_cost_usd)
        fill_keys, fill_args = self.fill_call(record, cache, fill_lease)
        budgets = self._settleable(record, budgets)
        settle_keys, budget_keys, settle_args = self.settle_call(record, budgets, fields)
        keys = {
            **fold_keys,
            **settle_keys,
            "cache_key": fill_keys["cache_key"],
            "fill_lease_key": fill_keys["lease_key"],
            "fill_waiters_key": fill_keys["waiters_key"],
        }
        del fold_args["entry_json"]  # the record's own
        args: dict[str, Scalar] = {
            **fold_args,
            "cache_value": fill_args["cache_value"],
            "cache_ttl_s": fill_args["cache_ttl_s"],
            "fill_lease_owner": fill_args["lease_owner"],
            "settled_ttl_s": settle_args["settled_ttl_s"],
        }
        assert settle_args["cost_nusd"] == fold_args["cost_nusd"]  # one argument in WHOLE
        return keys, budget_keys, args

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
        keys, tail, args = self.settle_call(record, budgets, entry)
        return self._settle(keys=keys, key_tail=tail, args=args)

    def settle_call(
        self, record: JobRecord, budgets: Sequence[BudgetHold], entry: dict[str, Any]
    ) -> tuple[dict[str, str], list[str], dict[str, Scalar]]:
        """The settle script's keys, budget keys and arguments for ``entry``."""
        args: dict[str, Scalar] = {"cost_nusd": nano(float(entry["cost_usd"])), "settled_ttl_s": self.settled_ttl_s}
        return {"reservation_key": self.keys.reservation(record)}, [hold.key for hold in budgets], args

    def _fill_and_release(self, record: JobRecord, cache: CacheFill | None, lease_key: str | None) -> Any:
        """Fill the cache and release a shared entry's lease (in the entry's slot), once the result is stored."""
        if cache is not None and lease_key is not None and lease_key.partition("|")[0] != cache.key:
            # Not one entry's (no key of today's makes it so): two calls, each in its own slot.
            return asyncio.gather(
                self._fill_and_release(record, cache, None), self._fill_and_release(record, None, lease_key)
            )
        keys, args = self.fill_call(record, cache, lease_key)
        return self._fill(keys=keys, args=args)

    def fill_call(
        self, record: JobRecord, cache: CacheFill | None, lease_key: str | None
    ) -> tuple[dict[str, str], dict[str, Scalar]]:
        """The fill script's keys and arguments: one entry's fill and its lease (see _fill_and_release)."""
        base = cache.key if cache is not None else (lease_key or "-").partition("|")[0]
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
        return keys, args


def _shared_lease(result: JobResult, lease_key: str | None) -> str | None:
    """The shared cache entry's lease the job holds, which the fill releases: none for a job's own lease (the
    record releases it) nor for a job served from the cache (the decide script answers before it takes one)."""
    if lease_key is None or lease_key.startswith("job:") or result.cache != "miss":
        return None
    return lease_key
