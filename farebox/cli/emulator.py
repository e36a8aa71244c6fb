"""``farebox emulator``: the local provider emulator (farebox/emulator/)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import uvloop

from farebox.emulator.knobs import EmulatorKnobs
from farebox.emulator.server import serve_until_signalled
from farebox.errors import InvalidRequest

_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--port", "port", int, "port to listen on (FAREBOX_EMULATOR_PORT, default 8099)"),
    ("--host", "host", str, "address to bind (default 127.0.0.1)"),
    ("--latency-ms", "latency_ms", float, "mean added latency per request, +-50%% jitter"),
    ("--fail-rate", "fail_rate", float, "share of requests answered with a 5xx"),
    ("--rate-limit-rate", "rate_limit_rate", float, "share answered 429 with Retry-After"),
    ("--timeout-rate", "timeout_rate", float, "share that never answer"),
    ("--malformed-rate", "malformed_rate", float, "share answered 200 with a body that is not JSON"),
    ("--truncated-rate", "truncated_rate", float, "share answered 200 with JSON cut in half"),
    ("--faulty", "faulty", str, "comma list of providers the fault rates apply to (default all)"),
    ("--seed", "seed", int, "seed for fault and latency draws (reproducible runs)"),
    (
        "--batch-delay-s",
        "batch_delay_s",
        float,
        "seconds until a batch ends (FAREBOX_EMULATOR_BATCH_DELAY_S, default 3)",
    ),
    ("--batch-fail-rate", "batch_fail_rate", float, "share of batches that fail as a whole"),
    ("--batch-expire-rate", "batch_expire_rate", float, "share of batches that expire with half their requests run"),
    ("--batch-error-line-rate", "batch_error_line_rate", float, "share of batch requests answered with a 500"),
    (
        "--outcomes",
        "outcomes",
        str,
        "JSONL of labelled prompts answered right or wrong per provider/model (FAREBOX_EMULATOR_OUTCOMES)",
    ),
)


def add_commands(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "emulator",
        help="run the local provider emulator (OpenAI, Anthropic and Gemini wire formats)",
        description="Flags override the FAREBOX_EMULATOR_* environment variables.",
    )
    for flag, dest, kind, text in _FLAGS:
        parser.add_argument(flag, dest=f"emulator_{dest}", type=kind, default=None, help=text)
    parser.set_defaults(func=run_command)


def knobs_from_args(args: argparse.Namespace) -> EmulatorKnobs:
    overrides = {
        dest: getattr(args, f"emulator_{dest}")
        for _, dest, _, _ in _FLAGS
        if getattr(args, f"emulator_{dest}", None) is not None
    }
    # Init arguments beat the environment in pydantic-settings, which is the precedence we want.
    return EmulatorKnobs(**overrides)


def run_command(args: argparse.Namespace, settings: object) -> int:
    try:
        knobs = knobs_from_args(args)
    except ValueError as exc:
        print(f"farebox emulator: invalid settings: {exc}", file=sys.stderr)
        return 2
    try:
        # uvloop, and httptools (which uvicorn picks when installed), halve the emulator's CPU per
        # request; it shares the cores with the pipeline in every benchmark.
        uvloop.run(serve_until_signalled(knobs))
    except InvalidRequest as exc:  # a bad --outcomes file, found before the port is opened
        print(f"farebox emulator: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"farebox emulator: cannot listen on {knobs.host}:{knobs.port}: {exc}", file=sys.stderr)
        return 1
    return 0
