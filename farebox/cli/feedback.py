"""``farebox feedback send`` (rate a finished job) and ``farebox feedback export`` (feedback as training data)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from farebox.settings import Settings

EXPORT_HELP = """Write the jobs with feedback as outcome data for `farebox router train`: one JSON line per prompt,
{"prompt"|"messages", "outcomes": {"provider/model": score}, "group", "output_tokens"}. Prompts are kept only
for jobs in an experiment (its keep_prompts_s); training needs two models' outcomes per prompt, which shadow
grading gives (the reference model counts as 1), so prompts with one model's outcome are left out unless --all."""


def score_arg(text: str) -> float | str:
    if text in ("good", "bad"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a score in [0, 1], or good or bad") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a score is in [0, 1]")
    return value


def cmd_send(args: argparse.Namespace, settings: Settings) -> int:
    from farebox.client import FareboxClient

    async def run() -> int:
        async with FareboxClient.from_settings(settings, wait_for_pipeline_s=args.timeout) as client:
            receipt = await client.feedback(
                args.job_id,
                args.score,
                tenant=args.tenant,
                source=args.source,
                label=args.label,
                wait=not args.no_wait,
                timeout=args.timeout,
            )
        if receipt is None:
            print("feedback published (not waiting for its receipt)", file=sys.stderr)
            return 0
        if receipt.status == "ok":
            print(f"feedback on {receipt.job_id} from {receipt.source}: {'replaced' if receipt.replaced else 'added'}")
            return 0
        assert receipt.error is not None
        print(f"error {receipt.error.code}: {receipt.error.message}", file=sys.stderr)
        return 1

    return asyncio.run(run())


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from farebox.feedback_export import ExportCounts, ExportFilter, PromptOutcomes, collect, export_lines
    from farebox.stages.main import make_redis

    filt = ExportFilter(
        sources=frozenset(args.source) if args.source else None,
        tenant=args.tenant,
        since=args.since,
        group_by=args.group_by,
    )

    async def gather() -> tuple[list[PromptOutcomes], ExportCounts]:
        redis = make_redis(settings)
        try:
            return await collect(redis, settings.keys, filt)
        finally:
            await redis.aclose()

    rows, counts = asyncio.run(gather())
    out = Path(args.output).open("w", encoding="utf-8") if args.output else sys.stdout
    try:
        for line in export_lines(rows, counts, everything=args.all):
            out.write(line + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    print(
        f"farebox feedback export: {counts.written} prompt(s) written from {counts.jobs} job(s) with feedback; "
        f"left out: {counts.no_prompt} without a kept prompt, {counts.filtered} outside the filters, "
        f"{counts.single_model} with one model's outcome only" + ("" if args.all else " (--all keeps them)"),
        file=sys.stderr,
    )
    return 0


def add_commands(sub: Any) -> None:
    from farebox.cli.report import _day

    group = sub.add_parser("feedback", help="rate finished jobs; export feedback as router training data")
    fsub = group.add_subparsers(dest="feedback_command", required=True)

    p = fsub.add_parser("send", help="publish feedback on a finished job to the feedback queue")
    p.add_argument("job_id")
    p.add_argument("score", type=score_arg, help="a score in [0, 1], or good / bad")
    p.add_argument("--tenant", help="the job's tenant (default: your user's only tenant, or 'default')")
    p.add_argument("--source", default="user", help="who rates: user, user-thumbs, grader... (default user)")
    p.add_argument("--label", help="e.g. the correct answer")
    p.add_argument("--no-wait", action="store_true", help="do not wait for the receipt")
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(func=cmd_send)

    p = fsub.add_parser("export", help="jobs with feedback as `router train` data", description=EXPORT_HELP)
    p.add_argument("-o", "--output", help="JSONL file to write (default stdout)")
    p.add_argument("--source", action="append", help="only this source's scores (repeatable; default all)")
    p.add_argument("--tenant")
    p.add_argument("--since", type=_day, metavar="YYYY-MM-DD", help="jobs of this UTC day and later")
    p.add_argument("--group-by", choices=["tenant", "experiment", "none"], default="tenant")
    p.add_argument("--all", action="store_true", help="also prompts with one model's outcome")
    p.set_defaults(func=cmd_export)
