"""Serve the emulator with uvicorn inside the caller's event loop, and the ``farebox emulator`` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import AsyncIterator, Generator
from typing import Any

import uvicorn
import uvloop

from farebox.emulator.app import EmulatorApp
from farebox.emulator.knobs import EmulatorKnobs

# A load test opens thousands of connections at once; the kernel queue must hold them all.
BACKLOG = 4096
STOP_GRACE_S = 5.0


class _Server(uvicorn.Server):
    # The host program owns SIGINT/SIGTERM (farebox up drains its children); uvicorn must not
    # swap the handlers out from under it.
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    # Binding here, not in uvicorn, turns "port in use" into an OSError for the caller instead
    # of uvicorn's sys.exit, and lets port 0 pick a free port that we can then report.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio only sets TCP_NODELAY on accepted sockets that do, and without it
    # every response waits ~40 ms on Nagle plus delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def running(knobs: EmulatorKnobs) -> AsyncIterator[str]:
    """Run the emulator for the duration of the block; yields its base URL (``http://host:port``)."""
    app = EmulatorApp(knobs)
    state = app.state
    # No proxy-headers middleware: nothing sits in front of the emulator, and it cost CPU per request.
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        backlog=BACKLOG,
        proxy_headers=False,
        limit_concurrency=None,
        timeout_graceful_shutdown=int(STOP_GRACE_S),
    )
    server = _Server(config)
    sock = _bind(knobs.host, knobs.port)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="farebox-emulator")
    try:
        while not server.started:
            if task.done():
                task.result()  # startup failed: raise its error
                raise RuntimeError("the emulator stopped during startup")
            await asyncio.sleep(0.01)
        port = sock.getsockname()[1]
        host = f"[{knobs.host}]" if ":" in knobs.host else knobs.host
        yield f"http://{host}:{port}"
    finally:
        state.stopping.set()
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=STOP_GRACE_S * 2)
        except (TimeoutError, asyncio.CancelledError):
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        sock.close()


async def serve(knobs: EmulatorKnobs, *, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled; ``ready`` is set once the port accepts connections."""
    async with running(knobs):
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()


# --- command line ----------------------------------------------------------------------------
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
)


def add_command(subparsers: Any) -> None:
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
        uvloop.run(_main(knobs))
    except OSError as exc:
        print(f"farebox emulator: cannot listen on {knobs.host}:{knobs.port}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _main(knobs: EmulatorKnobs) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running(knobs) as url:
        faults = ""
        if knobs.fault_total:
            faults = f", faults {knobs.fault_total:.0%} on {knobs.faulty or 'all providers'}"
        print(
            f"farebox emulator listening on {url} (latency {knobs.latency_ms:g} ms{faults})",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
