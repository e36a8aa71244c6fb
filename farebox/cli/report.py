"""``farebox report``: spend from the ledger, or with ``--by strategy`` the arms of the routing experiments."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from rich.console import Console

from farebox.errors import FareboxError, InvalidRequest
from farebox.settings import Settings

STRATEGY = "strategy"


def _day(text: str) -> str:
    # Checked while parsing, so a bad date is a usage error (exit 2) before Redis is touched.
    from farebox.report import parse_day

    try:
        return parse_day(text)
    except InvalidRequest as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _format(args: argparse.Namespace) -> str:
    return "json" if args.json else "csv" if args.csv else "table"


def _console() -> Console:
    return Console(width=160, soft_wrap=True)


def _check_by(by: tuple[str, ...], args: argparse.Namespace) -> None:
    from farebox.report import DIMENSIONS

    if STRATEGY in by:
        if len(by) > 1:
            others = ", ".join(d for d in by if d != STRATEGY)
            raise SystemExit(
                f"--by: strategy is a report of its own and cannot be combined with other dimensions ({others}); "
                "use --by strategy alone"
            )
        if args.tenant:
            raise SystemExit("--tenant: experiment arms are not kept per tenant, so it does not apply to --by strategy")
        return
    unknown = [d for d in by if d not in DIMENSIONS]
    if unknown:
        raise SystemExit(f"--by: unknown dimension(s) {', '.join(unknown)}; use {', '.join(DIMENSIONS)} or strategy")
    if args.source is not None:
        raise SystemExit("--source: only with --by strategy (the feedback source whose scores to compare)")


def arm_order(settings: Settings) -> dict[str, list[str]]:
    """Each experiment's arms in the policy's order (the first is the control); {} when the policy cannot be
    loaded, so the report still runs, with arms by name."""
    from farebox.routing.policy import load_policy

    try:
        policy = load_policy(settings.policy)
    except (FareboxError, OSError, ValueError) as exc:
        print(f"farebox report: policy not loaded ({exc}); arms by name, the first is the control", file=sys.stderr)
        return {}
    return {e.name: [a.name for a in e.arms] for e in policy.experiments}


def _strategy_report(args: argparse.Namespace, settings: Settings) -> int:
    from farebox.stages.main import make_redis
    from farebox.strategy_report import load_strategy_rows, render_strategy

    order = arm_order(settings)

    async def run() -> list[dict[str, Any]]:
        redis = make_redis(settings)
        try:
            return await load_strategy_rows(redis, settings.keys, since=args.since, arm_order=order, source=args.source)
        finally:
            await redis.aclose()

    render_strategy(asyncio.run(run()), _format(args), _console())
    return 0


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from farebox.report import Report, load_report, render
    from farebox.stages.main import make_redis

    by = tuple(d.strip() for d in args.by.split(",") if d.strip())
    _check_by(by, args)
    if by == (STRATEGY,):
        return _strategy_report(args, settings)

    async def run() -> Report:
        redis = make_redis(settings)
        try:
            return await load_report(redis, settings.keys, by=by, since=args.since, tenant=args.tenant)
        finally:
            await redis.aclose()

    report = asyncio.run(run())
    render(report.rows, by, _format(args), _console(), report.by_lane)
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("report", help="spend from the ledger, or the arms of the routing experiments")
    p.add_argument(
        "--by",
        default="tenant,model",
        help="comma list of tenant,model,provider,day,lane (lane: sync or batch); or strategy (on its own)",
    )
    p.add_argument("--since", type=_day, metavar="YYYY-MM-DD", help="first UTC day, YYYY-MM-DD")
    p.add_argument("--tenant")
    p.add_argument("--source", metavar="NAME", help="with --by strategy: only this feedback source's scores")
    p.add_argument("--json", action="store_true")
    p.add_argument("--csv", action="store_true")
    p.set_defaults(func=cmd_report)
