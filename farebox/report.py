"""``farebox report``: spend from the ledger's per-day aggregates, grouped as asked."""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from datetime import date
from typing import Any

from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table

from farebox.constants import NANO, RedisKeys, as_text
from farebox.errors import InvalidRequest

DIMENSIONS = ("tenant", "provider", "model", "day")
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


async def load_rows(
    redis: Redis, keys: RedisKeys, *, by: tuple[str, ...], since: str | None = None, tenant: str | None = None
) -> list[dict[str, Any]]:
    if since is not None:
        since = parse_day(since)
    days = sorted(as_text(d) for d in await redis.smembers(keys.ledger_days))
    groups: dict[tuple[str, ...], dict[str, int]] = defaultdict(lambda: dict.fromkeys(METRICS, 0))
    for day in days:
        if since and day < since:
            continue
        for field, value in (await redis.hgetall(keys.ledger_agg(day))).items():
            t, p, m, metric = as_text(field).split("|", 3)
            if tenant and t != tenant:
                continue
            dims = {"tenant": t, "provider": p, "model": m, "day": day}
            agg = groups[tuple(dims[d] for d in by)]
            agg[metric] = agg.get(metric, 0) + int(value)  # a metric of a newer release is carried, not a crash
    rows = []
    for key, agg in sorted(groups.items()):
        row: dict[str, Any] = dict(zip(by, key, strict=True))
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
        rows.append(row)
    return rows


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    t = {
        k: sum(r[k] for r in rows)
        for k in ("jobs", "cost_usd", "baseline_cost_usd", "cache_hits", "errors", "input_tokens", "output_tokens")
    }
    t["savings_usd"] = t["baseline_cost_usd"] - t["cost_usd"]
    return t


def render(rows: list[dict[str, Any]], by: tuple[str, ...], fmt: str, console: Console) -> None:
    total = totals(rows)
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
