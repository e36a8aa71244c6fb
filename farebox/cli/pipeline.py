"""``farebox up`` (the whole pipeline on this machine) and ``farebox worker`` (one stage)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from farebox.constants import STAGES
from farebox.routing.priority import LANES
from farebox.settings import Settings


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from farebox.supervisor import run_up

    return asyncio.run(run_up(settings, scale=dict(args.scale or [])))


def scale_arg(text: str) -> tuple[str, int]:
    """``STAGE=N`` for ``--scale``: a known stage and a whole number of replicas, 1 or more."""
    stage, _, n = text.partition("=")
    if stage not in STAGES:
        raise argparse.ArgumentTypeError(f"{text!r}: the stage must be one of {', '.join(STAGES)}")
    if not n.isdigit() or int(n) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give replicas as STAGE=N with N a whole number, 1 or more")
    return stage, int(n)


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from farebox.stages.main import worker_main

    return worker_main(settings, args.stage, args.provider, (args.lane,) if args.lane else LANES)


def add_commands(sub: Any) -> None:
    p = sub.add_parser("up", help="run the whole pipeline on this machine")
    p.add_argument(
        "--scale",
        action="append",
        type=scale_arg,
        metavar="STAGE=N",
        help="replicas of a stage (dedup, route, execute, account); repeatable",
    )
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("worker", help="run one stage (any number of replicas, any host)")
    p.add_argument("stage", choices=[*STAGES, "all"], help="all: every stage in this one process")
    p.add_argument(
        "--provider", help="with execute: the provider whose queue to serve; with batch: one provider (default all)"
    )
    p.add_argument(
        "--lane",
        choices=["interactive", "background"],
        help="serve only this lane's queues (default both, interactive first); a worker of the interactive lane "
        "alone is the broker's first choice for its queues",
    )
    p.set_defaults(func=cmd_worker)
