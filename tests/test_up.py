"""`farebox up` as a user runs it: every stage in its own process, a killed stage restarted,
SIGTERM drains and exits 0, and no job is lost on the way."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys

import pytest
from redis.asyncio import Redis

from farebox.client import FareboxClient
from farebox.settings import Settings
from farebox.supervisor import emulated_providers
from tests.support.chaos import distinct_jobs
from tests.support.pipeline import collect, drop_namespace, ledger_entries, settings_env
from tests.support.ports import free_port

STARTED = re.compile(r"farebox: (\S+) started \(pid (\d+)\)")


@pytest.mark.chaos  # about 18 s; .ci/run runs it
async def test_up_restarts_a_killed_stage_and_drains_on_sigterm(settings: Settings, redis: Redis) -> None:
    s = settings.model_copy(update={"emulator_port": free_port(), "emulator_url": None})
    env = settings_env(s)
    env.pop("FAREBOX_EMULATOR_URL", None)
    # A session of its own: if an assertion fails, the finally below kills `up` and every child
    # (orphans holding the stdout pipe would keep `up.wait()` from ever returning).
    up = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "farebox",
        "up",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    assert up.stdout is not None
    output: list[str] = []
    pids: dict[str, list[int]] = {}

    async def read() -> None:
        assert up.stdout is not None
        async for raw in up.stdout:
            line = raw.decode(errors="replace").rstrip()
            output.append(line)
            if m := STARTED.search(line):
                pids.setdefault(m.group(1), []).append(int(m.group(2)))

    reader = asyncio.create_task(read())
    try:
        jobs = distinct_jobs(1500, "up")  # still flowing when the route is killed
        async with FareboxClient.from_settings(s, wait_for_pipeline_s=60) as client:
            collecting = asyncio.create_task(collect(client.stream(jobs, max_in_flight=100)))
            for _ in range(100):
                if "route" in pids:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            os.kill(pids["route"][0], signal.SIGKILL)
            assert not collecting.done()  # the kill lands while jobs are in flight
            results = await asyncio.wait_for(collecting, 120)
        for _ in range(300):  # the restart is logged after a back-off, maybe after the last result
            if len(pids["route"]) == 2:
                break
            await asyncio.sleep(0.1)
        assert sorted(r.job_id for r in results) == sorted(str(j["job_id"]) for j in jobs)
        assert all(r.status == "ok" for r in results)
        assert len(pids["route"]) == 2, output  # started again after the kill
        assert any("route exited" in line and "restarting" in line for line in output)
        assert any("using the local emulator" in line for line in output)
        assert {
            "dedup",
            "route",
            "execute-openai",
            "execute-anthropic",
            "execute-google",
            "account",
            "emulator",
        } <= set(pids)
        up.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(up.wait(), 90) == 0
        await asyncio.wait_for(reader, 10)
        for name, ids in pids.items():  # every child is gone
            for pid in ids:
                try:
                    os.kill(pid, 0)
                    alive = True
                except ProcessLookupError:
                    alive = False
                assert not alive, f"{name} (pid {pid}) still running after farebox up exited"
        assert len(await ledger_entries(redis, s)) == len(jobs)
    finally:
        if up.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(up.pid, signal.SIGKILL)
            await up.wait()
        reader.cancel()
        await drop_namespace(s)


@pytest.mark.parametrize(
    ("env", "emulated"),
    [
        ({}, ["anthropic", "google", "openai"]),
        ({"OPENAI_API_KEY": "sk-x"}, ["anthropic", "google"]),  # only the keyless ones need the emulator
        ({"OPENAI_API_KEY": "sk-x", "ANTHROPIC_API_KEY": "a", "GEMINI_API_KEY": "g"}, []),
        ({"OPENAI_BASE_URL": "http://127.0.0.1:11434/v1"}, ["anthropic", "google"]),  # a keyless local server
    ],
)
def test_up_starts_the_emulator_for_exactly_the_providers_without_a_key(
    env: dict[str, str], emulated: list[str]
) -> None:
    assert emulated_providers(Settings(), env) == emulated
