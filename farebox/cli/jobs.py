"""``farebox submit`` (a JSONL backfill) and ``farebox ask`` (one request/response)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from farebox.settings import Settings

# As farebox/submit.py's docstring says; here so that building the parser imports nothing more.
SUBMIT_EXIT_CODES = """exit codes:
  0    every job ended ok
  1    a job ended in an error result (in this run, or already in the output when
       resuming), or a line failed locally (not JSON, not a valid job)
  2    usage or configuration error: bad arguments, FILE unreadable, OUT not
       writable, the broker unreachable, no pipeline's intake queue within 30 s
  130  interrupted (Ctrl-C): the summary so far and how to resume are printed
"""


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    from rich.console import Console

    from farebox.submit import Summary, resume_hint, submit

    console = Console(stderr=True)
    summary = Summary()
    try:
        asyncio.run(
            submit(
                settings,
                Path(args.file),
                Path(args.output) if args.output else None,
                summary=summary,
                max_in_flight=args.max_in_flight,
                quiet=args.quiet,
                console=console,
                priority=args.priority,
                lane=args.lane,
            )
        )
    except KeyboardInterrupt:
        summary.interrupted = True
    if not args.quiet:
        console.print(summary.table())
    if summary.interrupted:
        print(resume_hint(args.file, args.output), file=sys.stderr)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary.as_dict(), indent=2))
    return summary.exit_code


def warn(message: str) -> None:
    print(f"farebox: warning: {message}", file=sys.stderr, flush=True)


def cmd_ask(args: argparse.Namespace, settings: Settings) -> int:
    from farebox.client import FareboxClient

    job: dict[str, object] = {"prompt": args.prompt, "quality": args.quality, "tenant": args.tenant}
    if args.model:
        job["model"] = args.model
    if args.task:
        job["task"] = args.task

    async def run() -> int:
        deadline = time.monotonic() + args.timeout  # for the pipeline to come up and answer, together
        client = FareboxClient.from_settings(
            settings, coalesce_writes=True, on_no_pipeline=warn, wait_for_pipeline_s=args.timeout
        )
        async with client:
            result = await client.complete(job, timeout=max(deadline - time.monotonic(), 0.1), priority=args.priority)
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


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "submit",
        help="publish a JSONL file of jobs and collect the results",
        description="Publish a JSONL file of jobs and collect the results, with a closing summary.",
        epilog=SUBMIT_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file")
    p.add_argument("-o", "--output", help="append results here; rerun with it to resume")
    p.add_argument("--max-in-flight", type=positive_int, default=256)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--summary-json", help="also write the closing summary here as JSON")
    p.add_argument(
        "--priority",
        choices=["background", "interactive"],
        default="background",
        help="the lane of jobs whose line names none (default: background, behind interactive work)",
    )
    p.add_argument(
        "--lane",
        choices=["sync", "batch"],
        default=None,
        help="the price lane of jobs whose line names none: batch waits hours for the providers' Batch APIs "
        "at about half price (default: the policy's batch section decides)",
    )
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("ask", help="one request/response over the queue")
    p.add_argument("prompt")
    p.add_argument("--quality", choices=["low", "medium", "high"], default="medium")
    p.add_argument("--tenant", default="default")
    p.add_argument("--model")
    p.add_argument("--task")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--priority",
        choices=["interactive", "background"],
        default="interactive",
        help="its lane (default: interactive, served ahead of background work)",
    )
    p.set_defaults(func=cmd_ask)
