"""``farebox submit`` (a JSONL backfill) and ``farebox ask`` (one request/response)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from farebox.settings import Settings


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
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


def cmd_ask(args: argparse.Namespace, settings: Settings) -> int:
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


def add_commands(sub: Any) -> None:
    p = sub.add_parser("submit", help="publish a JSONL file of jobs and collect the results")
    p.add_argument("file")
    p.add_argument("-o", "--output", help="append results here; rerun with it to resume")
    p.add_argument("--max-in-flight", type=int, default=256)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--summary-json", help="also write the closing summary here as JSON")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("ask", help="one request/response over the queue")
    p.add_argument("prompt")
    p.add_argument("--quality", choices=["low", "medium", "high"], default="medium")
    p.add_argument("--tenant", default="default")
    p.add_argument("--model")
    p.add_argument("--task")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ask)
