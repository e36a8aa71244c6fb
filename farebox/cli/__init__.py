"""The ``farebox`` command line (CONTRACT.md lists every command)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console

from farebox.constants import STAGES
from farebox.errors import FareboxError
from farebox.logs import setup_logging
from farebox.settings import Settings

Handler = Callable[[argparse.Namespace, Settings], int]


def _cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from farebox.supervisor import run_up

    scale = {}
    for item in args.scale or []:
        stage, _, n = item.partition("=")
        scale[stage] = int(n)
    return asyncio.run(run_up(settings, scale=scale))


def _cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from farebox.stages.main import worker_main

    return worker_main(settings, args.stage, args.provider)


def _cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    from farebox.submit import submit

    summary = asyncio.run(
        submit(
            settings,
            Path(args.file),
            Path(args.output) if args.output else None,
            max_in_flight=args.max_in_flight,
            quiet=args.quiet,
        )
    )
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary.as_dict(), indent=2))
    return 0


def _cmd_ask(args: argparse.Namespace, settings: Settings) -> int:
    from farebox.client import FareboxClient

    job: dict[str, object] = {"prompt": args.prompt, "quality": args.quality, "tenant": args.tenant}
    if args.model:
        job["model"] = args.model
    if args.task:
        job["task"] = args.task

    async def run() -> int:
        async with FareboxClient.from_settings(settings) as client:
            result = await client.complete(job, timeout=args.timeout)
        if args.json:
            print(result.model_dump_json(indent=2))
        elif result.status == "ok":
            print(result.content)
            print(
                f"-- {result.provider}/{result.model}, cache {result.cache}, ${result.cost_usd:.6f} "
                f"(baseline ${result.baseline_cost_usd:.6f})",
                file=sys.stderr,
            )
        else:
            assert result.error is not None
            print(f"error {result.error.code}: {result.error.message}", file=sys.stderr)
        return 0 if result.status == "ok" else 1

    return asyncio.run(run())


def _cmd_report(args: argparse.Namespace, settings: Settings) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farebox", description="A cost-aware LLM job pipeline.")
    parser.add_argument("--log-json", action="store_true", help="log JSON lines (or FAREBOX_LOG_JSON=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="run the whole pipeline on this machine")
    p.add_argument(
        "--scale",
        action="append",
        metavar="STAGE=N",
        help="replicas of a stage (dedup, route, execute, account); repeatable",
    )
    p.set_defaults(func=_cmd_up)

    p = sub.add_parser("worker", help="run one stage (any number of replicas, any host)")
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--provider", help="with execute: the provider whose queue to serve")
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("submit", help="publish a JSONL file of jobs and collect the results")
    p.add_argument("file")
    p.add_argument("-o", "--output", help="append results here; rerun with it to resume")
    p.add_argument("--max-in-flight", type=int, default=256)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--summary-json", help="also write the closing summary here as JSON")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("ask", help="one request/response over the queue")
    p.add_argument("prompt")
    p.add_argument("--quality", choices=["low", "medium", "high"], default="medium")
    p.add_argument("--tenant", default="default")
    p.add_argument("--model")
    p.add_argument("--task")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_ask)

    p = sub.add_parser("report", help="spend from the ledger")
    p.add_argument("--by", default="tenant,model", help="comma list of tenant,model,provider,day")
    p.add_argument("--since", help="first UTC day, YYYY-MM-DD")
    p.add_argument("--tenant")
    p.add_argument("--json", action="store_true")
    p.add_argument("--csv", action="store_true")
    p.set_defaults(func=_cmd_report)

    from farebox.cli.catalog import add_commands as add_catalog_commands
    from farebox.emulator.server import add_command as add_emulator_command

    add_catalog_commands(sub)
    add_emulator_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    setup_logging(settings.log_level, json_lines=settings.log_json or args.log_json)
    try:
        code: int = args.func(args, settings)
    except FareboxError as err:
        print(f"farebox: error {err.code}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code
