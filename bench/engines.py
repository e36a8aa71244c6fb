"""Pipeline jobs/s (one OS process per stage, emulator at 0 ms) on different Redis and RabbitMQ engines, side by
side in one run: every round runs each variant once (the order rotating from round to round), so all of them see
the same machine, and each variant's jobs/s is compared with ``single`` of the same round.

    single          the machine's RabbitMQ (127.0.0.1:5672) and Redis (127.0.0.1:6379)
    before          the same engines, the stages of commit db30b53 (a git worktree, PYTHONPATH for the stages)
    redis-cluster   a 3-master Redis Cluster (tests/support/redis_cluster.py), redis+cluster://
    sentinel-wait   master + replica + Sentinel (tests/support/redis_sentinel.py), FAREBOX_REDIS_WAIT_REPLICAS=1
    sentinel        the same, FAREBOX_REDIS_WAIT_REPLICAS=0 (no WAIT)
    rabbit-cluster  a 3-node RabbitMQ cluster (tests/support/rabbit_cluster.py)
    both-clusters   rabbit-cluster and redis-cluster together

The engines started here are started once and kept for every run; all of them run (idle when not in use) during
every variant's runs, so they weigh on each variant alike. CPU ms per job is read from /proc per process group
(as bench/pipeline_throughput.py does). Prints the tables and writes bench/results/engines.md.

    .venv/bin/python bench/engines.py --jobs 2000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pwd
import subprocess
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    ROOT,
    CpuGroups,
    broker_pids,
    check_imports,
    emulator_process,
    make_workload,
    pids_of,
    process_pipeline,
    process_tree,
    publish_table,
    wait_for_emulator,
)
from engines_tables import BEFORE_COMMIT, Results, render
from redis.asyncio import Redis

from farebox.client import FareboxClient
from tests.support.pipeline import ALL_STAGES
from tests.support.rabbit_cluster import RabbitCluster, rabbit_cluster
from tests.support.redis_cluster import RedisClusterNodes, redis_cluster
from tests.support.redis_sentinel import SentinelSet, sentinel_set

PORT = 8099
SINGLE_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
SINGLE_REDIS = "redis://127.0.0.1:6379/0"
VARIANTS = ("single", "before", "redis-cluster", "sentinel-wait", "sentinel", "rabbit-cluster", "both-clusters")
RUN_TIMEOUT_S = 600.0
RABBITMQ_UID = pwd.getpwnam("rabbitmq").pw_uid  # the machine's broker runs as rabbitmq, the clusters here do not


@dataclass
class Engines:
    before_tree: Path | None = None
    rcluster: RedisClusterNodes | None = None
    sentinel: SentinelSet | None = None
    rabbit: RabbitCluster | None = None


@dataclass
class Variant:
    name: str
    overrides: dict[str, Any]
    child_env: dict[str, str] | None
    rabbit_pids: list[int]
    redis_pids: list[int]
    wait_probe_port: int | None = None  # a Redis whose WAIT calls are counted over the run (the Sentinel's master)


def redis_server_pids(ports: list[int]) -> list[int]:
    return [pid for port in ports for pid in pids_of(f"redis-server .*:{port}( |$)")]


def machine_broker_pids() -> list[int]:
    return [p for p in broker_pids() if Path(f"/proc/{p}").stat().st_uid == RABBITMQ_UID]


def beam_pids(cluster: RabbitCluster) -> list[int]:
    """The Erlang VM of each node the cluster started (the script exec's or forks it)."""
    found = []
    for node in cluster.nodes:
        assert node.process is not None
        for pid in process_tree_beams(node.process.pid):
            found.append(pid)
    return found


def process_tree_beams(root: int) -> list[int]:
    out = []
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            if b"beam.smp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
    return out


def variants(engines: Engines, machine_broker: list[int], machine_redis: list[int]) -> dict[str, Variant]:
    single = {"amqp_url": SINGLE_AMQP, "redis_url": SINGLE_REDIS}
    out = {
        "single": Variant("single", single, None, machine_broker, machine_redis),
        "before": Variant("before", single, {"PYTHONPATH": str(engines.before_tree)}, machine_broker, machine_redis),
    }
    if engines.rcluster is not None:
        rc = engines.rcluster
        out["redis-cluster"] = Variant(
            "redis-cluster", dict(single, redis_url=rc.url), None, machine_broker, redis_server_pids(list(rc.ports))
        )
    if engines.sentinel is not None:
        s = engines.sentinel
        pids = redis_server_pids([s.master_port, s.replica_port, s.sentinel_port])
        for name, replicas in (("sentinel-wait", 1), ("sentinel", 0)):
            over = dict(single, redis_url=s.url, redis_wait_replicas=replicas)
            out[name] = Variant(name, over, None, machine_broker, pids, s.master_address()[1])
    if engines.rabbit is not None:
        urls = ",".join(engines.rabbit.urls)
        beams = beam_pids(engines.rabbit)
        out["rabbit-cluster"] = Variant("rabbit-cluster", dict(single, amqp_url=urls), None, beams, machine_redis)
        if engines.rcluster is not None:
            rc = engines.rcluster
            out["both-clusters"] = Variant(
                "both-clusters",
                {"amqp_url": urls, "redis_url": rc.url},
                None,
                beams,
                redis_server_pids(list(rc.ports)),
            )
    return out


@contextlib.contextmanager
def worktree(commit: str, path: Path) -> Iterator[Path]:
    if path.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit], check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)


async def wait_calls(port: int | None) -> int:
    """WAIT commands served so far by the Redis on ``port`` (INFO commandstats)."""
    if port is None:
        return 0
    async with Redis(port=port, socket_timeout=5) as r:
        stats = await r.info("commandstats")
    return int(stats.get("cmdstat_wait", {}).get("calls", 0))


async def one_run(emulator: str, v: Variant, jobs: list[dict[str, object]]) -> tuple[float, dict[str, float]]:
    async with (
        process_pipeline(emulator, child_env=v.child_env, **v.overrides) as (settings, procs),
        FareboxClient.from_settings(settings, wait_for_pipeline_s=90, coalesce_writes=True) as client,
    ):
        run = settings.namespace
        await client.complete({"prompt": "warm up", "job_id": f"warm-{run}"}, timeout=90)
        tagged = [dict(j, job_id=f"{run}-{i}") for i, j in enumerate(jobs)]
        groups: dict[str, list[int]] = {name: [p.pid] for name, p in procs.procs.items()}
        groups["rabbitmq"] = v.rabbit_pids
        groups["redis"] = v.redis_pids
        groups["emulator"] = pids_of(f"emulator --port {PORT}")
        groups["client"] = [os.getpid()]
        waits = await wait_calls(v.wait_probe_port)
        meter = CpuGroups(groups)
        t0 = time.perf_counter()
        n = 0

        async def drain() -> None:
            nonlocal n
            async for _ in client.stream(tagged, max_in_flight=1000):
                n += 1

        try:
            await asyncio.wait_for(drain(), RUN_TIMEOUT_S)
        except TimeoutError:
            raise RuntimeError(f"stalled: {n} of {len(tagged)} results in {RUN_TIMEOUT_S:.0f} s") from None
        rate = n / (time.perf_counter() - t0)
        if n != len(tagged):
            raise RuntimeError(f"{n} results for {len(tagged)} jobs")
        cpu = meter.per_job_ms(n)
        if v.wait_probe_port is not None:
            cpu["WAIT calls per job (count, not ms)"] = (await wait_calls(v.wait_probe_port) - waits) / n
        dead = {name: p.returncode for name, p in procs.procs.items() if p.poll() is not None}
        if dead:
            raise RuntimeError(f"stage processes exited during the run: {dead}")
    return rate, cpu


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--before-tree", default="/tmp/fb-before")
    a = ap.parse_args()
    names = [n for n in VARIANTS if n in a.variants.split(",")]
    jobs, _ = make_workload(a.jobs, 0, seed=1)
    res = Results()
    need_rc = {"redis-cluster", "both-clusters"} & set(names)
    need_sent = {"sentinel", "sentinel-wait"} & set(names)
    need_rabbit = {"rabbit-cluster", "both-clusters"} & set(names)
    machine_redis = pids_of(r"redis-server .*:6379( |$)")
    with contextlib.ExitStack() as stack:
        engines = Engines()
        tree = stack.enter_context(worktree(BEFORE_COMMIT, Path(a.before_tree)))
        engines.before_tree = tree
        os.chdir(stack.enter_context(tempfile.TemporaryDirectory(prefix="fb-engines-")))
        before_file = check_imports(tree)
        print(f"before: a child imports farebox from {before_file}", flush=True)
        if need_rc:
            engines.rcluster = stack.enter_context(redis_cluster(3))
            print(f"redis cluster: {engines.rcluster.url}", flush=True)
        if need_sent:
            engines.sentinel = stack.enter_context(sentinel_set())
            print(f"sentinel: {engines.sentinel.url}", flush=True)
        if need_rabbit:
            t = time.monotonic()
            engines.rabbit = stack.enter_context(rabbit_cluster(3))
            print(f"rabbit cluster: {engines.rabbit.urls} ({time.monotonic() - t:.0f} s to start)", flush=True)
        machine_broker = machine_broker_pids()
        if len(machine_broker) != 1 or len(machine_redis) != 1:
            raise SystemExit(f"expected one machine broker and one Redis on 6379: {machine_broker}, {machine_redis}")
        table = variants(engines, machine_broker, machine_redis)
        emulator = stack.enter_context(emulator_process(PORT))
        await wait_for_emulator()
        for n in names:
            res.rates[n] = []
        for r in range(a.runs):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                t = time.monotonic()
                try:
                    rate, cpu = await one_run(emulator, table[name], jobs)
                except Exception as err:  # a failed run is reported, the others go on
                    res.rates[name].append(None)
                    res.errors.append(f"round {r + 1}, {name}: {type(err).__name__}: {err}")
                    print(f"round {r + 1} {name}: FAILED {err!r}", flush=True)
                    traceback.print_exc()
                    continue
                res.rates[name].append(rate)
                for g, ms in cpu.items():
                    res.cpu.setdefault(name, {}).setdefault(g, []).append(ms)
                stages_ms = sum(cpu[s] for s in ALL_STAGES)
                print(
                    f"round {r + 1} {name}: {rate:.0f} jobs/s, stages {stages_ms:.2f} CPU ms/job, "
                    f"rabbitmq {cpu['rabbitmq']:.2f}, redis {cpu['redis']:.2f} ({time.monotonic() - t:.0f} s)",
                    flush=True,
                )
    publish_table("engines", render(a, res, names, before_file))


if __name__ == "__main__":
    asyncio.run(main())
