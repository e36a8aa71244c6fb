"""farebox against the gateway users would pick instead: the LiteLLM proxy, side by side in one run,
both in front of the same provider emulator (0 ms), with the same jobs and the same concurrency.

The harness installs LiteLLM itself, into a virtual environment of its own (bench/.litellm-venv),
pinned to one exact release. Releases 1.82.7 and 1.82.8 carried malware and those before 1.83.7
have a known remote-code-execution hole, so the pin is checked against that floor, and after the
install the environment is searched for `litellm_init.pth` (the file the malicious releases used to
run code at every interpreter start); the harness refuses to go on if one is there. The proxy and
the emulator listen on 127.0.0.1 only, with a random master key.

Per run, alternating: LiteLLM (no cache) and farebox on fresh jobs; LiteLLM with its Redis cache
and farebox on jobs with 30% exact repeats. Measured: requests/s, CPU ms per request (the proxy's
process tree vs farebox's stage processes, with the broker and Redis shown apart), p50 added
latency one request at a time (over a direct call to the emulator), memory, provider calls.

    .venv/bin/python bench/litellm_peer.py --jobs 3000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import venv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from common import (
    ROOT,
    CpuGroups,
    broker_pids,
    cores,
    emulator_process,
    peak_rss_mb,
    port_is_free,
    process_pipeline,
    process_tree,
    publish_table,
    redis_pids,
    rss_mb,
    spread,
    wait_for_emulator,
)
from http_driver import KeepAlive
from pipeline_throughput import WORKLOAD

from farebox.client import FareboxClient
from farebox.settings import Settings

LITELLM_VERSION = "1.106.12"  # newest release whose [proxy] extra resolves from PyPI on 2026-11-27
SAFE_FLOOR = (1, 83, 7)
KNOWN_MALICIOUS = {"1.82.7", "1.82.8"}
VENV = ROOT / "bench" / ".litellm-venv"
EMULATOR_PORT = 8093
PROXY_PORT = 4017
MASTER_KEY = "sk-" + secrets.token_hex(24)  # a fresh random key per harness run
MODEL = "gpt-4o-mini"  # what every LiteLLM request asks for; farebox routes by its policy instead


# --- installing the peer ---------------------------------------------------------------------------------------
def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(part) for part in v.split(".")[:3])


KNOWN_PTH = {"distutils-precedence.pth"}  # setuptools' own, in every virtual environment


def _code_running_pth() -> list[Path]:
    """.pth files that would run code at every start of the venv's Python (lines beginning with
    `import` are executed by site.py), other than setuptools' own; litellm_init.pth in any case."""
    found = []
    for pth in VENV.glob("lib/python*/site-packages/*.pth"):
        lines = pth.read_text(errors="replace").splitlines()
        if pth.name == "litellm_init.pth" or (pth.name not in KNOWN_PTH and any(
                line.startswith(("import ", "import\t")) for line in lines)):
            found.append(pth)
    return found


def _refuse_if_planted() -> None:
    planted = _code_running_pth()
    if planted:
        shutil.rmtree(VENV)
        raise SystemExit(f"refusing to run: {', '.join(map(str, planted))} would run code at every start of the "
                         f"venv's Python (litellm_init.pth was the 1.82.7/1.82.8 malware's hook); {VENV} removed")


def _installed_version() -> str | None:
    """Read from the dist-info, so no interpreter of the venv runs before the .pth check."""
    for meta in VENV.glob("lib/python*/site-packages/litellm-*.dist-info/METADATA"):
        for line in meta.read_text(errors="replace").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return None


def ensure_litellm() -> Path:
    if LITELLM_VERSION in KNOWN_MALICIOUS or _version_tuple(LITELLM_VERSION) < SAFE_FLOOR:
        raise SystemExit(f"refusing litellm=={LITELLM_VERSION}: older than 1.83.7 or a known malicious release")
    if VENV.exists():
        _refuse_if_planted()  # before any of the venv's own Python runs
    python = VENV / "bin" / "python"
    if not python.exists():
        venv.create(VENV, with_pip=True)
    if _installed_version() != LITELLM_VERSION:
        print(f"installing litellm[proxy]=={LITELLM_VERSION} into {VENV} ...", file=sys.stderr)
        # Wheels only: no package's build script runs during the install.
        subprocess.run([python, "-m", "pip", "install", "-q", "--only-binary=:all:",
                        f"litellm[proxy]=={LITELLM_VERSION}"], check=True)
    _refuse_if_planted()
    return VENV / "bin" / "litellm"


@contextlib.contextmanager
def litellm_proxy(exe: Path, emulator: str, *, cache_namespace: str | None, workers: int) -> Iterator[tuple[str, int]]:
    """The proxy on 127.0.0.1 with one model served by the emulator; yields (url, pid)."""
    if not port_is_free(PROXY_PORT):
        raise SystemExit(f"port {PROXY_PORT} is taken (a stale proxy?); free it before benchmarking")
    with tempfile.TemporaryDirectory(prefix="fbbench-litellm-") as tmp:
        settings: dict[str, Any] = {"telemetry": False}
        if cache_namespace:
            redis = urlsplit(Settings().redis_url)  # the Redis farebox uses, so both sides share one server
            settings.update(cache=True, cache_params={"type": "redis", "host": redis.hostname or "127.0.0.1",
                                                      "port": redis.port or 6379, "namespace": cache_namespace})
        config = {"model_list": [{"model_name": MODEL, "litellm_params": {
            "model": f"openai/{MODEL}", "api_base": f"{emulator}/openai/v1", "api_key": "sk-emulator"}}],
            "litellm_settings": settings}
        (Path(tmp) / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
        env = {"PATH": os.environ.get("PATH", ""), "HOME": tmp, "LITELLM_MASTER_KEY": MASTER_KEY,
               "LITELLM_LOCAL_MODEL_COST_MAP": "True", "NO_PROXY": "127.0.0.1,localhost"}
        with open(Path(tmp) / "proxy.log", "wb") as log:
            proc = subprocess.Popen([exe, "--config", "config.yaml", "--host", "127.0.0.1", "--port", str(PROXY_PORT),
                                     "--num_workers", str(workers)], cwd=tmp, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            url = f"http://127.0.0.1:{PROXY_PORT}"
            try:
                _wait_until_up(url, proc, Path(tmp) / "proxy.log")
                yield url, proc.pid
            finally:
                _stop_group(proc)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the proxy's process group (uvicorn workers included), SIGKILL what is left after 30 s,
    so no stale proxy keeps the port for the next run."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)



def _wait_until_up(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the LiteLLM proxy exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            # An authenticated call: only the proxy we started knows this run's key.
            if httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {MASTER_KEY}"},
                         timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise SystemExit(f"the LiteLLM proxy did not answer in 180 s:\n{log.read_text()[-3000:]}")


# --- the same jobs, as farebox jobs and as OpenAI requests ------------------------------------------------------
def make_jobs(n: int, dup_rate: float, seed: int, tag: str) -> list[dict[str, Any]]:
    out = subprocess.run([sys.executable, str(WORKLOAD), "--jobs", str(n), "--dup-rate", str(dup_rate),
                          "--seed", str(seed)], capture_output=True, text=True, check=True).stdout
    jobs = [json.loads(line) for line in out.splitlines()]
    for job in jobs:  # a run tag in the text keeps one run's answers out of the next run's cache
        job["messages"][-1]["content"] += f"\n[{tag}]"
        job.pop("job_id")
    return jobs


def openai_body(job: dict[str, Any]) -> dict[str, Any]:
    return {"model": MODEL, "messages": job["messages"], "max_tokens": job["max_tokens"],
            "temperature": job["temperature"]}


@dataclass
class Side:
    """One system's figures over the runs."""
    rate: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    broker_ms: list[float] = field(default_factory=list)
    redis_ms: list[float] = field(default_factory=list)
    added_p50: list[float] = field(default_factory=list)
    peak_mb: list[float] = field(default_factory=list)
    infra_mb: list[float] = field(default_factory=list)  # RabbitMQ and Redis, where the system uses them
    driver_ms: list[float] = field(default_factory=list)  # the bench process that sends the load
    provider_calls: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)


async def provider_calls(emulator: str) -> int:
    async with httpx.AsyncClient() as http:
        return sum((await http.get(f"{emulator}/_emulator/stats")).json()["requests"].values())


async def reset_emulator(emulator: str) -> None:
    async with httpx.AsyncClient() as http:
        await http.post(f"{emulator}/_emulator/reset")


async def http_drive(url: str, bodies: Sequence[dict[str, Any]], concurrency: int) -> tuple[float, int]:
    """requests/s with `concurrency` callers, each on a persistent connection of its own (bench/http_driver.py:
    a lean client, because the driver shares the cores with the proxy)."""
    todo = iter(bodies)
    errors = 0

    async def caller() -> None:
        nonlocal errors
        conn = KeepAlive(url, {"Authorization": f"Bearer {MASTER_KEY}"})
        try:
            for body in todo:
                status, _ = await conn.post("/v1/chat/completions", body)
                errors += status != 200
        finally:
            await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return len(bodies) / (time.perf_counter() - t0), errors


async def http_singles(url: str, path: str, bodies: Sequence[dict[str, Any]], auth: bool) -> float:
    """p50 ms, one request at a time (the same lean client for the proxy and the direct emulator call)."""
    conn = KeepAlive(url, {"Authorization": f"Bearer {MASTER_KEY}"} if auth else {})
    lat = []
    try:
        for body in bodies:
            t = time.perf_counter()
            status, payload = await conn.post(path, body)
            lat.append((time.perf_counter() - t) * 1000)
            if status != 200:
                raise SystemExit(f"{url}{path} answered {status}: {payload[:300]!r}")
    finally:
        await conn.close()
    return statistics.median(lat)


async def litellm_side(exe: Path, emulator: str, jobs: Sequence[dict[str, Any]], side: Side, a: argparse.Namespace,
                       *, cache_namespace: str | None, singles: Sequence[dict[str, Any]], direct_p50: float) -> None:
    with litellm_proxy(exe, emulator, cache_namespace=cache_namespace, workers=a.litellm_workers) as (url, pid):
        warm = [{"model": MODEL, "messages": [{"role": "user", "content": f"warm up {uuid.uuid4()}"}], "max_tokens": 5}
                for _ in range(50)]
        await http_drive(url, warm, 4)
        await reset_emulator(emulator)
        tree = process_tree(pid)
        meter = CpuGroups({"proxy": tree, "broker": broker_pids(), "redis": redis_pids(), "driver": [os.getpid()]})
        rate, errors = await http_drive(url, [openai_body(j) for j in jobs], a.concurrency)
        _record(side, rate, errors, meter.per_job_ms(len(jobs)), await provider_calls(emulator),
                sum(peak_rss_mb(p) for p in tree), redis_pids() if cache_namespace else [])
        if singles:
            side.added_p50.append(await http_singles(url, "/v1/chat/completions", [openai_body(j) for j in singles],
                                                     auth=True) - direct_p50)


async def farebox_side(emulator: str, jobs: Sequence[dict[str, Any]], side: Side, a: argparse.Namespace,
                       *, singles: Sequence[dict[str, Any]], direct_p50: float) -> None:
    async with process_pipeline(emulator) as (settings, procs), \
            FareboxClient.from_settings(settings, wait_for_pipeline_s=60) as client:
        run = settings.namespace
        async for _ in client.stream([{"prompt": f"warm up {run} {i}", "max_tokens": 5} for i in range(50)],
                                     max_in_flight=4):
            pass
        await reset_emulator(emulator)
        stages = [p.pid for p in procs.procs.values()]
        meter = CpuGroups({"proxy": stages, "broker": broker_pids(), "redis": redis_pids(), "driver": [os.getpid()]})
        errors = 0
        t0 = time.perf_counter()
        async for r in client.stream([dict(j, job_id=f"{run}-{i}") for i, j in enumerate(jobs)],
                                     max_in_flight=a.concurrency):
            errors += r.status != "ok"
        rate = len(jobs) / (time.perf_counter() - t0)
        _record(side, rate, errors, meter.per_job_ms(len(jobs)), await provider_calls(emulator),
                sum(peak_rss_mb(p) for p in stages), broker_pids() + redis_pids())
        if singles:
            lat = []
            for i, job in enumerate(singles):
                t = time.perf_counter()
                r = await client.complete(dict(job, job_id=f"{run}-single-{i}"), timeout=60)
                lat.append((time.perf_counter() - t) * 1000)
                assert r.status == "ok", r.error
            side.added_p50.append(statistics.median(lat) - direct_p50)


def _record(side: Side, rate: float, errors: int, cpu: dict[str, float], calls: int, peak_mb: float,
            infra: list[int]) -> None:
    side.infra_mb.append(sum(rss_mb(pid) for pid in infra))
    side.driver_ms.append(cpu["driver"])
    side.rate.append(rate)
    side.errors.append(errors)
    side.cpu_ms.append(cpu["proxy"])
    side.broker_ms.append(cpu["broker"])
    side.redis_ms.append(cpu["redis"])
    side.provider_calls.append(calls)
    side.peak_mb.append(peak_mb)


async def drop_litellm_keys(namespace: str) -> None:
    from redis.asyncio import Redis
    async with Redis.from_url(Settings().redis_url) as redis:
        async for key in redis.scan_iter(match=f"{namespace}*", count=1000):
            await redis.delete(key)


def row(name: str, lite: Sequence[float], fare: Sequence[float], spec: str, ratio: bool = True) -> str:
    cells = f"| {name} | {spread(lite, spec) if lite else '-'} | {spread(fare, spec) if fare else '-'} |"
    if ratio and lite and fare and all(lite):
        return cells + f" {spread([f / x for f, x in zip(fare, lite, strict=True)], '.2f')} |"
    return cells + " - |"


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--singles", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--litellm-workers", type=int, default=cores(), help="uvicorn workers; default one per core")
    a = ap.parse_args()
    exe = ensure_litellm()
    lite0, fare0, lite30, fare30 = Side(), Side(), Side(), Side()
    direct: list[float] = []
    with emulator_process(EMULATOR_PORT) as emulator:
        await wait_for_emulator()
        for _ in range(a.runs):  # alternate, so drift on this noisy machine hits both alike
            tag = uuid.uuid4().hex[:8]
            fresh, repeats = make_jobs(a.jobs, 0.0, 1, tag), make_jobs(a.jobs, 0.3, 2, tag)
            singles = make_jobs(a.singles, 0.0, 3, f"{tag}-single")
            direct.append(await http_singles(emulator, "/openai/v1/chat/completions",
                                             [openai_body(j) for j in singles], auth=False))
            await litellm_side(exe, emulator, fresh, lite0, a, cache_namespace=None, singles=singles,
                               direct_p50=direct[-1])
            await farebox_side(emulator, fresh, fare0, a, singles=singles, direct_p50=direct[-1])
            namespace = f"fbbench-litellm-{tag}"
            try:
                await litellm_side(exe, emulator, repeats, lite30, a, cache_namespace=namespace, singles=(),
                                   direct_p50=0)
            finally:
                await drop_litellm_keys(namespace)
            await farebox_side(emulator, repeats, fare30, a, singles=(), direct_p50=0)
    total = [[c + b + r for c, b, r in zip(s.cpu_ms, s.broker_ms, s.redis_ms, strict=True)] for s in (lite0, fare0)]
    memory = [[p + i for p, i in zip(s.peak_mb, s.infra_mb, strict=True)] for s in (lite0, fare0)]
    publish_table("litellm_peer", "\n".join([
        f"# farebox vs the LiteLLM proxy {LITELLM_VERSION} ({cores()} cores, {a.runs} alternating runs, {a.jobs} jobs, "
        f"{a.concurrency} in flight, emulator at 0 ms, LiteLLM --num_workers {a.litellm_workers})", "",
        "Median (min, max) over the runs; the ratio is farebox/LiteLLM, taken run by run.", "",
        "| measure | LiteLLM proxy | farebox | ratio |", "|---|---|---|---|",
        row("fresh jobs: requests/s", lite0.rate, fare0.rate, ".0f"),
        row("CPU ms/request: proxy process tree / farebox stage processes", lite0.cpu_ms, fare0.cpu_ms, ".2f"),
        row("CPU ms/request: RabbitMQ", lite0.broker_ms, fare0.broker_ms, ".2f", ratio=False),
        row("CPU ms/request: Redis", lite0.redis_ms, fare0.redis_ms, ".2f", ratio=False),
        row("CPU ms/request: all of the above", total[0], total[1], ".2f"),
        row("p50 added latency ms, one at a time (over a direct emulator call)", lite0.added_p50, fare0.added_p50,
            ".1f"),
        row("CPU ms/request: the bench process driving the load (HTTP callers / FareboxClient)", lite0.driver_ms,
            fare0.driver_ms, ".2f", ratio=False),
        row("peak RSS MiB, sum of its processes (proxy tree / stage processes)", lite0.peak_mb, fare0.peak_mb, ".0f"),
        row("RSS MiB at the end of the run, RabbitMQ + Redis it needs (none for LiteLLM without cache)",
            lite0.infra_mb, fare0.infra_mb, ".0f", ratio=False),
        row("memory, both of the above", memory[0], memory[1], ".0f"),
        row("errors", lite0.errors, fare0.errors, ".0f", ratio=False),
        row("30% repeats, Redis cache on: requests/s", lite30.rate, fare30.rate, ".0f"),
        row("30% repeats: provider calls", lite30.provider_calls, fare30.provider_calls, ".0f"),
        row("30% repeats: CPU ms/request, proxy / stages", lite30.cpu_ms, fare30.cpu_ms, ".2f"),
        row("30% repeats: RSS MiB of RabbitMQ + Redis it uses", lite30.infra_mb, fare30.infra_mb, ".0f", ratio=False),
        row("30% repeats: errors", lite30.errors, fare30.errors, ".0f", ratio=False), "",
        f"Direct emulator call, one at a time, p50 ms: {spread(direct, '.1f')}. Jobs: make_workload.py --jobs {a.jobs} "
        f"(--dup-rate 0 --seed 1 and --dup-rate 0.3 --seed 2). LiteLLM sends every job to openai/{MODEL}; farebox "
        "routes each by its policy (all providers are the emulator). farebox's figures include routing, PII scan, "
        "budgets, the ledger and durable queues; LiteLLM's include its spend tracking and logging defaults. "
        "RabbitMQ's and Redis's memory is the whole server's (other data included), not farebox's share.", ""]))
    failed = sum(sum(s.errors) for s in (lite0, fare0, lite30, fare30))
    if failed:
        raise SystemExit(f"{failed:.0f} request(s) failed: the figures above are not comparable")


if __name__ == "__main__":
    asyncio.run(main())
