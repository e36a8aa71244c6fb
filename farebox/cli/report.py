"""``farebox report``: spend from the ledger."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from rich.console import Console

from farebox.errors import InvalidRequest
from farebox.settings import Settings


def _day(text: str) -> str:
    # Checked while parsing, so a bad date is a usage error (exit 2) before Redis is touched.
    from farebox.report import parse_day

    try:
        return parse_day(text)
    except InvalidRequest as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from farebox.report import DIMENSIONS, load_rows, render
    from farebox.stages.main import make_redis

    by = tuple(d.strip() for d in args.by.split(",") if d.strip())
    unknown = [d for d in by if d not in DIMENSIONS]
    if unknown:
        raise SystemExit(f"--by: unknown dimension(s) {', '.join(unknown)}; use {', '.join(DIMENSIONS)}")

    async def run() -> list[dict[str, object]]:
        redis = make_redis(settings)
        try:
            return await load_rows(redis, settings.keys, by=by, since=args.since, tenant=args.tenant)
        finally:
            await redis.aclose()

    rows = asyncio.run(run())
    fmt = "json" if args.json else "csv" if args.csv else "table"
    render(rows, by, fmt, Console(width=160, soft_wrap=True))
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("report", help="spend from the ledger")
    p.add_argument("--by", default="tenant,model", help="comma list of tenant,model,provider,day")
    p.add_argument("--since", type=_day, metavar="YYYY-MM-DD", help="first UTC day, YYYY-MM-DD")
    p.add_argument("--tenant")
    p.add_argument("--json", action="store_true")
    p.add_argument("--csv", action="store_true")
    p.set_defaults(func=cmd_report)
