"""``farebox report --by strategy``: the arms of each routing experiment side by side, from the per-day arm
aggregates of the ledger and of the quality feedback.

Per (experiment, arm, feedback source): the jobs and spend of the arm and the mean feedback score with a 95%
interval, and the difference from the experiment's control arm (its first arm in the policy) with a 95%
interval and a two-sided p-value. Intervals and p-values are the normal approximation (z = 1.96) over the
sample variance, which is what n, sum and sum of squares allow; with few scores per arm they are rough.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table

from farebox.constants import NANO, RedisKeys, as_text
from farebox.report import parse_day

Z95 = 1.96
ALPHA = 0.05
ARM_METRICS = ("jobs", "cost_nusd", "baseline_nusd", "errors", "cache_hits", "shadow_nusd")
NOTE = (
    "ci95 is mean ± 1.96 * standard error and diff_ci95 is diff ± 1.96 * the difference's standard error "
    "(normal approximation, z = 1.96, sample variance); p_value is the two-sided normal test of "
    "diff_vs_control, significant when below 0.05; the control is the experiment's first arm in the policy"
)

Interval = tuple[float, float]
ArmKey = tuple[str, str]  # experiment, arm
SourceKey = tuple[str, str, str]  # experiment, arm, source


@dataclass(frozen=True)
class ScoreStats:
    """The scores of one arm from one source: None where fewer scores than the value needs."""

    n: int
    mean: float | None
    var: float | None
    se: float | None
    ci95: Interval | None


@dataclass(frozen=True)
class Comparison:
    """An arm's mean score against the control's, for the same source."""

    diff: float | None
    se: float | None
    ci95: Interval | None
    p_value: float | None
    significant: bool | None


NO_COMPARISON = Comparison(None, None, None, None, None)


def score_stats(n: int, total: float, sumsq: float) -> ScoreStats:
    """Mean, sample variance (clamped at 0 against rounding), standard error and normal 95% interval."""
    if n <= 0:
        return ScoreStats(0, None, None, None, None)
    mean = total / n
    if n < 2:
        return ScoreStats(n, mean, None, None, None)
    var = max(0.0, (sumsq - n * mean * mean) / (n - 1))
    se = math.sqrt(var / n)
    return ScoreStats(n, mean, var, se, (mean - Z95 * se, mean + Z95 * se))


def compare(arm: ScoreStats, control: ScoreStats) -> Comparison:
    """``arm`` minus ``control``: the difference of the means (when both have one), and when both have at least
    two scores its standard error, 95% interval and two-sided normal p-value. A standard error of 0 (every score
    alike on both sides) gives p 1.0 for no difference and 0.0 for any other."""
    if arm.mean is None or control.mean is None:
        return NO_COMPARISON
    diff = arm.mean - control.mean
    if arm.se is None or control.se is None:
        return Comparison(diff, None, None, None, None)
    se = math.sqrt(arm.se**2 + control.se**2)
    if se == 0:
        p = 1.0 if diff == 0 else 0.0
    else:
        p = math.erfc(abs(diff / se) / math.sqrt(2))
    return Comparison(diff, se, (diff - Z95 * se, diff + Z95 * se), p, p < ALPHA)


def ordered_arms(experiment: str, seen: Iterable[str], arm_order: Mapping[str, Sequence[str]]) -> list[str]:
    """The policy's arms of ``experiment`` in its order (the first is the control), then any other arm seen in
    the data, by name. Arms of the policy with no data are kept, so the control stays the policy's first arm."""
    listed = list(dict.fromkeys(arm_order.get(experiment, ())))
    return listed + sorted(set(seen) - set(listed))


@dataclass
class Aggregates:
    """The arm hashes of the selected days, summed."""

    ledger: dict[ArmKey, dict[str, int]]
    feedback: dict[SourceKey, list[float]]  # n, sum, sumsq

    @classmethod
    def empty(cls) -> Aggregates:
        return cls(defaultdict(lambda: dict.fromkeys(ARM_METRICS, 0)), defaultdict(lambda: [0.0, 0.0, 0.0]))

    def add_ledger(self, field: str, value: bytes | str) -> None:
        parts = field.split("|", 2)
        if len(parts) == 3 and parts[2] in ARM_METRICS:
            self.ledger[(parts[0], parts[1])][parts[2]] += int(value)

    def add_feedback(self, field: str, value: bytes | str) -> None:
        parts = field.split("|", 2)
        if len(parts) < 3 or "|" not in parts[2]:
            return
        source, stat = parts[2].rsplit("|", 1)
        slot = {"n": 0, "sum": 1, "sumsq": 2}.get(stat)
        if slot is not None:
            self.feedback[(parts[0], parts[1], source)][slot] += float(value)


def _money(nusd: int) -> float:
    return nusd / NANO


def _ledger_columns(agg: Mapping[str, int]) -> dict[str, Any]:
    jobs = agg.get("jobs", 0)
    return {
        "jobs": jobs,
        "cost_usd": _money(agg.get("cost_nusd", 0)),
        "cost_per_job_usd": _money(agg.get("cost_nusd", 0)) / jobs if jobs else None,
        "baseline_cost_usd": _money(agg.get("baseline_nusd", 0)),
        "errors": agg.get("errors", 0),
        "cache_hits": agg.get("cache_hits", 0),
        "shadow_cost_usd": _money(agg.get("shadow_nusd", 0)),
    }


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def _interval(ci: Interval | None) -> list[float] | None:
    return list(ci) if ci is not None else None


def _experiment_rows(
    experiment: str, aggs: Aggregates, arm_order: Mapping[str, Sequence[str]], source: str | None
) -> list[dict[str, Any]]:
    seen = {a for e, a in aggs.ledger if e == experiment} | {a for e, a, _ in aggs.feedback if e == experiment}
    arms = ordered_arms(experiment, seen, arm_order)
    control = arms[0]
    stats = {
        (a, s): score_stats(int(v[0]), v[1], v[2])
        for (e, a, s), v in aggs.feedback.items()
        if e == experiment and (source is None or s == source) and v[0] > 0
    }
    control_cpj = _ledger_columns(aggs.ledger.get((experiment, control), {}))["cost_per_job_usd"]
    rows: list[dict[str, Any]] = []
    for arm in (a for a in arms if a in seen):
        ledger = _ledger_columns(aggs.ledger.get((experiment, arm), {}))
        sources: list[str | None] = [*sorted(s for a, s in stats if a == arm)] or [None]
        for src in sources:
            mine = stats[(arm, src)] if src is not None else score_stats(0, 0.0, 0.0)
            cmp = NO_COMPARISON
            if arm != control and src is not None and (control, src) in stats:
                cmp = compare(mine, stats[(control, src)])
            rows.append(
                {"experiment": experiment, "arm": arm, "control": control, "source": src}
                | ledger
                | {
                    "feedback": mine.n,
                    "mean_score": mine.mean,
                    "ci95": _interval(mine.ci95),
                    "diff_vs_control": cmp.diff,
                    "diff_ci95": _interval(cmp.ci95),
                    "p_value": cmp.p_value,
                    "significant": cmp.significant,
                    "cost_ratio_vs_control": _ratio(ledger["cost_per_job_usd"], control_cpj),
                }
            )
    return rows


def build_rows(
    aggs: Aggregates, arm_order: Mapping[str, Sequence[str]] | None = None, source: str | None = None
) -> list[dict[str, Any]]:
    """One row per (experiment, arm, source) with feedback, or (experiment, arm, None) for an arm without any
    (from ``source``, when given): by experiment, then arm order (control first), then source."""
    experiments = sorted({e for e, _ in aggs.ledger} | {e for e, _, _ in aggs.feedback})
    return [row for e in experiments for row in _experiment_rows(e, aggs, arm_order or {}, source)]


async def load_aggregates(redis: Redis, keys: RedisKeys, *, since: str | None = None) -> Aggregates:
    """The arm hashes of every ledger day (from ``since``, a YYYY-MM-DD day, when given), summed."""
    if since is not None:
        since = parse_day(since)
    days = sorted(as_text(d) for d in await redis.smembers(keys.ledger_days))
    aggs = Aggregates.empty()
    for day in days:
        if since and day < since:
            continue
        for field, value in (await redis.hgetall(keys.ledger_arms(day))).items():
            aggs.add_ledger(as_text(field), value)
        for field, value in (await redis.hgetall(keys.feedback_arms(day))).items():
            aggs.add_feedback(as_text(field), value)
    return aggs


async def load_strategy_rows(
    redis: Redis,
    keys: RedisKeys,
    *,
    since: str | None = None,
    arm_order: Mapping[str, Sequence[str]] | None = None,
    source: str | None = None,
) -> list[dict[str, Any]]:
    """The strategy report's rows (see ``build_rows``); ``arm_order`` maps an experiment to its arms in the
    policy's order, whose first is the control (an experiment not in it: arms by name)."""
    return build_rows(await load_aggregates(redis, keys, since=since), arm_order, source)


def _num(value: float | None, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)


def _with_ci(value: float | None, ci: Sequence[float] | None, sign: str = "") -> str:
    if value is None:
        return ""
    text = format(value, f"{sign}.3f")
    return f"{text} [{ci[0]:{sign}.3f}, {ci[1]:{sign}.3f}]" if ci else text


def _flat(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row for CSV: each interval as two columns."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in ("ci95", "diff_ci95"):
            out[f"{key}_lo"], out[f"{key}_hi"] = value if value else (None, None)
        else:
            out[key] = value
    return out


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="farebox strategies", caption=NOTE)
    for col in ("experiment", "arm", "jobs", "cost/job", "source", "feedback", "mean [95% CI]"):
        table.add_column(col, justify="right" if col in ("jobs", "cost/job", "feedback") else "left")
    for col in ("diff vs control [95% CI]", "p", "significant", "shadow spend"):
        table.add_column(col, justify="right")
    for r in rows:
        significant = {True: "yes", False: "no", None: ""}[r["significant"]]
        table.add_row(
            r["experiment"],
            f"{r['arm']} (control)" if r["arm"] == r["control"] else r["arm"],
            str(r["jobs"]),
            "" if r["cost_per_job_usd"] is None else f"${r['cost_per_job_usd']:.6f}",
            r["source"] or "",
            str(r["feedback"]),
            _with_ci(r["mean_score"], r["ci95"]),
            _with_ci(r["diff_vs_control"], r["diff_ci95"], "+"),
            _num(r["p_value"], ".4f"),
            significant,
            f"${r['shadow_cost_usd']:.6f}",
        )
    return table


def render_strategy(rows: list[dict[str, Any]], fmt: str, console: Console) -> None:
    if fmt == "json":
        console.print_json(json.dumps({"rows": rows, "note": NOTE}))
        return
    if fmt == "csv":
        flat = [_flat(r) for r in rows]
        buf = io.StringIO()
        if flat:
            writer = csv.DictWriter(buf, fieldnames=list(flat[0]))
            writer.writeheader()
            writer.writerows(flat)
        console.print(buf.getvalue(), end="", markup=False, highlight=False)
        return
    console.print(_table(rows))
