"""A ledger entry: what one job's record says (its JSON), and the day arithmetic the aggregates are kept by."""

from __future__ import annotations

import json
import time
from typing import Any

from farebox.constants import NANO
from farebox.schemas import JobResult

# Entry format 2: the aggregates and budgets are folded in after the record (see _young).
ENTRY_VERSION = 2


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
    return entry_text(entry_fields(result, ts=ts, evaluation=evaluation))


def entry_text(fields: dict[str, Any]) -> str:
    """An entry's JSON as recorded."""
    return json.dumps(fields, separators=(",", ":"))


def entry_fields(result: JobResult, *, ts: float, evaluation: str | None = None) -> dict[str, Any]:
    """What ``result``'s ledger entry says, recorded at ``ts``."""
    strategy = result.route.strategy if result.route else None
    arm: dict[str, str] = {"experiment": strategy.experiment, "arm": strategy.arm} if strategy else {}
    if evaluation is not None:
        arm["evaluation"] = evaluation
    return {
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
        "v": ENTRY_VERSION,
    }
