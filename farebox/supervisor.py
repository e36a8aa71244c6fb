"""``farebox up``: the whole pipeline on this machine, one OS process per stage.

Each stage is ``farebox worker ...`` in its own process (so a crash, a leak or a busy CPU stays in
that process), restarted with backoff when it dies. SIGTERM/Ctrl-C is passed on to every child,
each drains its in-flight messages, and ``up`` exits 0. With no provider key set, the local
provider emulator is started too and every provider points at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from farebox.providers.registry import emulator_url, provider_configs
from farebox.settings import Settings

log = logging.getLogger("farebox.up")

MAX_BACKOFF_S = 30.0
HEALTHY_AFTER_S = 30.0  # a child that ran this long resets its backoff
STOP_GRACE_S = 45.0


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    metrics_port: int | None
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    backoff_s: float = 0.5
    started_at: float = field(default=0.0)


def plan_children(settings: Settings, env: dict[str, str], *, scale: dict[str, int], use_emulator: bool) -> list[Child]:
    exe = [sys.executable, "-m", "farebox"]
    base_env = dict(env)
    children: list[Child] = []
    port = settings.metrics_port
    if use_emulator:
        base_env["FAREBOX_EMULATOR_URL"] = emulator_url(settings)
        children.append(Child("emulator", [*exe, "emulator", "--port", str(settings.emulator_port)], base_env, None))
    providers = sorted(provider_configs(base_env, emulator_url=base_env.get("FAREBOX_EMULATOR_URL")))
    stages: list[tuple[str, list[str]]] = [("dedup", ["dedup"]), ("route", ["route"])]
    stages += [(f"execute-{p}", ["execute", "--provider", p]) for p in providers]
    stages.append(("account", ["account"]))
    stages.append(("batch", ["batch"]))  # every provider's batch lane, one process: it mostly waits
    # Every stage's interactive lane in one more process, the broker's first choice for those queues: its event
    # loop is never busy with a backfill, as the stage processes' may be (bench/fairness.py).
    stages.append(("interactive", ["all", "--lane", "interactive"]))
    for name, args in stages:
        for i in range(scale.get(name.split("-")[0], 1)):
            child_env = dict(base_env, FAREBOX_METRICS_PORT=str(port) if port else "0")
            label = name if i == 0 else f"{name}#{i + 1}"
            children.append(Child(label, [*exe, "worker", *args], child_env, port or None))
            if port:
                port += 1
    return children


async def _run_child(child: Child, stopping: asyncio.Event) -> None:
    while not stopping.is_set():
        child.started_at = time.monotonic()
        child.process = await asyncio.create_subprocess_exec(*child.argv, env=child.env)
        print(f"farebox: {child.name} started (pid {child.process.pid})", flush=True)
        code = await child.process.wait()
        if stopping.is_set():
            return
        ran = time.monotonic() - child.started_at
        if ran > HEALTHY_AFTER_S:
            child.backoff_s = 0.5
        child.restarts += 1
        log.warning(
            "%s exited with code %s after %.1fs; restarting in %.1fs (restart %d)",
            child.name,
            code,
            ran,
            child.backoff_s,
            child.restarts,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), child.backoff_s)
        child.backoff_s = min(child.backoff_s * 2, MAX_BACKOFF_S)


def emulated_providers(settings: Settings, env: dict[str, str]) -> list[str]:
    """The providers the workers will send to the emulator: the registry's own rule (no key and no
    base URL), so `up` starts an emulator exactly when some execute stage will call it."""
    configs = provider_configs(env, emulator_url=emulator_url(settings))
    return sorted(name for name, config in configs.items() if config.emulated)


async def run_up(settings: Settings, *, scale: dict[str, int]) -> int:
    env = dict(os.environ)
    # Start an emulator when any provider needs one and FAREBOX_EMULATOR_URL does not point at one.
    emulated = emulated_providers(settings, env)
    use_emulator = bool(emulated) and settings.emulator_url is None
    children = plan_children(settings, env, scale=scale, use_emulator=use_emulator)
    if emulated:
        print(
            f"farebox: no API key for {', '.join(emulated)}; using the local emulator at {emulator_url(settings)}",
            flush=True,
        )
    for c in children:
        where = f"metrics :{c.metrics_port}" if c.metrics_port else "no metrics"
        print(f"farebox: {c.name:<18} {where}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    tasks = [asyncio.create_task(_run_child(c, stopping)) for c in children]
    await stopping.wait()
    print("farebox: stopping; draining every stage", flush=True)
    # Stages first, the emulator last, so in-flight provider calls can finish.
    for c in sorted(children, key=lambda c: c.name == "emulator"):
        if c.process and c.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                c.process.send_signal(signal.SIGTERM)
    procs = [c.process for c in children if c.process]
    try:
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), STOP_GRACE_S)
    except TimeoutError:
        for p in procs:
            if p.returncode is None:
                p.kill()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return 0
