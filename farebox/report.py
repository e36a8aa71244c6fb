"""``farebox report``: spend from the ledger's per-day aggregates, grouped as asked.

``lane`` splits each group into the sync and the batch price lane: the ledger keeps ``batch_*`` fields for the
jobs answered through a provider batch, and the sync lane is the rest. Without batch jobs nothing of the report
changes; with some, the JSON total carries ``by_lane`` and the table ends with a line on each lane's spend.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import date
from typing import Any

from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table

from farebox.constants import NANO, RedisKeys, as_text
from farebox.errors import InvalidRequest

DIMENSIONS = ("tenant", "provider", "model", "day", "lane")
LANE = "lane"
METRICS = (
    "jobs",
    "cost_nusd",
    "baseline_nusd",
    "input_tokens",
    "output_tokens",
    "cache_hits",
    "errors",
    "evaluation_nusd",  # the part of cost_nusd that was evaluation spend (shadow grading of experiments)
)
# The part of a group's aggregates that went through provider batches (farebox/stages/ledger.py).
BATCH_METRICS = {
    "jobs": "batch_jobs",
    "cost_nusd": "batch_cost_nusd",
    "baseline_nusd": "batch_baseline_nusd",
    "input_tokens": "batch_input_tokens",
    "output_tokens": "batch_output_tokens",
}
Agg = dict[str, int]
# Exactly the ledger's day keys: date.fromisoformat alone would also take "20261201" or "2026-W48-2".
_DAY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_day(text: str) -> str:
    """``text`` if it is a real YYYY-MM-DD date, else InvalidRequest. Days are compared as strings with the
    ledger's day keys, so anything else ("12/01/2026", "yesterday") would silently select all days or none."""
    try:
        if _DAY_RE.match(text):
            date.fromisoformat(text)
            return text
    except ValueError:
        pass
    raise InvalidRequest(f"{text!r} is not a date; give the first UTC day as YYYY-MM-DD, e.g. 2026-12-01")


@dataclass(frozen=True)
class Report:
    rows: list[dict[str, Any]]
    by_lane: dict[str, dict[str, Any]] | None  # None when no batch job is in the selection


async def _groups(
    redis: Redis, keys: RedisKeys, by: tuple[str, ...], since: str | None, tenant: str | None
) -> dict[tuple[str, ...], Agg]:
    """The raw nano-dollar aggregates of each group of the dimensions ``by`` (lane excepted). Days recorded
    under the key names of before the cluster layout (``ledger:day:<day>``, an upgraded single server's
    history) are read too and added: nothing writes them any more, and they expire as they always did."""
    days = await _days(redis, keys)
    groups: dict[tuple[str, ...], Agg] = defaultdict(lambda: dict.fromkeys(METRICS, 0))
    for day, key in days:
        if since and day < since:
            continue
        for field, value in (await redis.hgetall(key)).items():
            t, p, m, metric = as_text(field).split("|", 3)
            if tenant and t != tenant:
                continue
            dims = {"tenant": t, "provider": p, "model": m, "day": day}
            agg = groups[tuple(dims[d] for d in by if d != LANE)]
            agg[metric] = agg.get(metric, 0) + int(value)  # a metric of a newer release is carried, not a crash
    return groups


async def _days(redis: Redis, keys: RedisKeys) -> list[tuple[str, str]]:
    """Each ledger day with the key of its aggregates, of today's layout and of the one before, by day."""
    current = {as_text(d) for d in await redis.smembers(keys.ledger_days)}
    legacy = {as_text(d) for d in await redis.smembers(keys.legacy_ledger_days)}
    pairs = [(d, keys.ledger_agg(d)) for d in current] + [(d, keys.legacy_ledger_agg(d)) for d in legacy]
    return sorted(pairs)


def _split(agg: Agg) -> dict[str, Agg]:
    """``agg`` as its sync and batch lanes (only the lanes with jobs). A batch job is never a cache hit or an
    error; evaluation spend stays with the sync lane, as the ledger does not split it."""
    batch = {m: agg.get(b, 0) for m, b in BATCH_METRICS.items()}
    sync = {m: v - batch.get(m, 0) for m, v in agg.items() if m in METRICS}
    lanes = {"batch": {**dict.fromkeys(METRICS, 0), **batch}, "sync": sync}
    return {lane: a for lane, a in lanes.items() if a["jobs"]}


def _row(dims: dict[str, str], agg: Agg) -> dict[str, Any]:
    row: dict[str, Any] = dict(dims)
    row.update(
        jobs=agg["jobs"],
        cost_usd=agg["cost_nusd"] / NANO,
        baseline_cost_usd=agg["baseline_nusd"] / NANO,
        savings_usd=(agg["baseline_nusd"] - agg["cost_nusd"]) / NANO,
        input_tokens=agg["input_tokens"],
        output_tokens=agg["output_tokens"],
        cache_hits=agg["cache_hits"],
        errors=agg["errors"],
        evaluation_cost_usd=agg["evaluation_nusd"] / NANO,
        cache_hit_rate=round(agg["cache_hits"] / agg["jobs"], 4) if agg["jobs"] else 0.0,
    )
    return row


def lane_totals(aggs: list[Agg]) -> dict[str, dict[str, Any]] | None:
    """Spend and savings of each price lane over ``aggs``; None when none of them holds a batch job."""
    total = {f: sum(a.get(f, 0) for a in aggs) for f in ("jobs", "cost_nusd", "baseline_nusd")}
    batch = {f: sum(a.get(f"batch_{f}", 0) for a in aggs) for f in ("jobs", "cost_nusd", "baseline_nusd", "sync_nusd")}
    if not batch["jobs"]:
        return None
    sync = {f: total[f] - batch[f] for f in total}
    return {
        "sync": {
            "jobs": sync["jobs"],
            "cost_usd": sync["cost_nusd"] / NANO,
            "baseline_cost_usd": sync["baseline_nusd"] / NANO,
            "savings_usd": (sync["baseline_nusd"] - sync["cost_nusd"]) / NANO,
        },
        "batch": {
            "jobs": batch["jobs"],
            "cost_usd": batch["cost_nusd"] / NANO,
            "baseline_cost_usd": batch["baseline_nusd"] / NANO,
            "savings_usd": (batch["baseline_nusd"] - batch["cost_nusd"]) / NANO,
            "sync_cost_usd": batch["sync_nusd"] / NANO,
            # What the batch lane saved against running the same jobs on the same models synchronously.
            "batch_savings_usd": (batch["sync_nusd"] - batch["cost_nusd"]) / NANO,
        },
    }


async def load_report(
    redis: Redis, keys: RedisKeys, *, by: tuple[str, ...], since: str | None = None, tenant: str | None = None
) -> Report:
    if since is not None:
        since = parse_day(since)
    groups = await _groups(redis, keys, by, since, tenant)
    plain = tuple(d for d in by if d != LANE)
    keyed: list[tuple[tuple[str, ...], dict[str, str], Agg]] = []
    for key, agg in groups.items():
        dims = dict(zip(plain, key, strict=True))
        for lane, part in _split(agg).items() if LANE in by else [("", agg)]:
            full = {d: lane if d == LANE else dims[d] for d in by}
            keyed.append((tuple(full.values()), full, part))
    rows = [_row(dims, agg) for _, dims, agg in sorted(keyed, key=lambda k: k[0])]
    return Report(rows, lane_totals(list(groups.values())))


async def load_rows(
    redis: Redis, keys: RedisKeys, *, by: tuple[str, ...], since: str | None = None, tenant: str | None = None
) -> list[dict[str, Any]]:
    return (await load_report(redis, keys, by=by, since=since, tenant=tenant)).rows


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    t = {
        k: sum(r[k] for r in rows)
        for k in ("jobs", "cost_usd", "baseline_cost_usd", "cache_hits", "errors", "input_tokens", "output_tokens")
    }
    t["savings_usd"] = t["baseline_cost_usd"] - t["cost_usd"]
    return t


def render(
    rows: list[dict[str, Any]],
    by: tuple[str, ...],
    fmt: str,
    console: Console,
    by_lane: dict[str, dict[str, Any]] | None = None,
) -> None:
    total = totals(rows)
    if by_lane is not None:
        total["by_lane"] = by_lane
    if fmt == "json":
        console.print_json(json.dumps({"rows": rows, "total": total}))
        return
    if fmt == "csv":
        buf = io.StringIO()
        if rows:
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        console.print(buf.getvalue(), end="", markup=False, highlight=False)
        return
    table = Table(title="farebox spend")
    for d in by:
        table.add_column(d)
    for col in ("jobs", "cost", "baseline", "savings", "hit rate", "errors", "tokens in/out"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            *(str(r[d]) for d in by),
            str(r["jobs"]),
            f"${r['cost_usd']:.6f}",
            f"${r['baseline_cost_usd']:.6f}",
            f"${r['savings_usd']:.6f}",
            f"{100 * r['cache_hit_rate']:.1f}%",
            str(r["errors"]),
            f"{r['input_tokens']}/{r['output_tokens']}",
        )
    table.add_row(
        *(["total"] + [""] * (len(by) - 1)),
        str(total["jobs"]),
        f"${total['cost_usd']:.6f}",
        f"${total['baseline_cost_usd']:.6f}",
        f"${total['savings_usd']:.6f}",
        "",
        str(total["errors"]),
        "",
        style="bold",
    )
    console.print(table)
    if by_lane is not None:
        console.print(lane_summary(by_lane), markup=False, highlight=False)


def lane_summary(by_lane: dict[str, dict[str, Any]]) -> str:
    """The table's closing line on each price lane's spend and savings."""
    sync, batch = by_lane["sync"], by_lane["batch"]
    return (
        f"by lane: sync {sync['jobs']} jobs ${sync['cost_usd']:.6f} (saved ${sync['savings_usd']:.6f} vs the "
        f"baseline); batch {batch['jobs']} jobs ${batch['cost_usd']:.6f} (saved ${batch['savings_usd']:.6f} vs "
        f"the baseline, ${batch['batch_savings_usd']:.6f} vs ${batch['sync_cost_usd']:.6f} on the same models sync)"
    )
