"""Serve the emulator with uvicorn inside the caller's event loop, and the ``farebox emulator`` command."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import AsyncIterator, Generator

import uvicorn

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


async def serve_until_signalled(knobs: EmulatorKnobs) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running(knobs) as url:
        faults = ""
        if knobs.fault_total:
            faults = f", faults {knobs.fault_total:.0%} on {knobs.faulty or 'all providers'}"
        if knobs.outcomes:
            faults += f", outcomes from {knobs.outcomes}"
        batch_faults = (knobs.batch_fail_rate, knobs.batch_expire_rate, knobs.batch_error_line_rate)
        if any(batch_faults):
            faults += ", batch faults fail {:.0%} / expire {:.0%} / line errors {:.0%}".format(*batch_faults)
        print(
            f"farebox emulator listening on {url} (latency {knobs.latency_ms:g} ms, "
            f"batches end after {knobs.batch_delay_s:g} s{faults})",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
