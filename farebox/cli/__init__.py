"""The ``farebox`` command line: one module per group of commands, all registered here
(docs/CONTRACT.md lists every command)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from farebox.cli import catalog, emulator, evaluate, feedback, jobs, keys, pipeline, policy, report, router, tenants
from farebox.errors import FareboxError, describe_validation_error
from farebox.logs import setup_logging
from farebox.settings import Settings

COMMAND_MODULES = (pipeline, jobs, report, feedback, tenants, catalog, policy, keys, emulator, router, evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farebox", description="A cost-aware LLM job pipeline.")
    parser.add_argument("--log-json", action="store_true", help="log JSON lines (or FAREBOX_LOG_JSON=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as err:
        print(f"farebox: invalid FAREBOX_* setting: {describe_validation_error(err)}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, json_lines=settings.log_json or args.log_json)
    try:
        code: int = args.func(args, settings)
    except FareboxError as err:
        print(f"farebox: error {err.code}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code
