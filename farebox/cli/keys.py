"""``farebox keys upgrade [--apply]``: move a single Redis server's keys of before the Redis Cluster layout to
today's names (farebox/key_upgrade.py)."""

from __future__ import annotations

import argparse
from typing import Any

from farebox.settings import Settings


def cmd_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from farebox.key_upgrade import main

    return main(["--apply"] if args.apply else [])


def add_commands(sub: Any) -> None:
    group = sub.add_parser("keys", help="Redis key maintenance")
    ksub = group.add_subparsers(dest="keys_command", required=True)
    p = ksub.add_parser(
        "upgrade",
        help="move keys of before the Redis Cluster layout to today's names (pipeline stopped, queues drained)",
    )
    p.add_argument("--apply", action="store_true", help="rename the keys (without it: only count them)")
    p.set_defaults(func=cmd_upgrade)
