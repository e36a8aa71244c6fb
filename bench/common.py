"""What the pipeline benchmarks share: an emulator process, a pipeline of real worker processes in
a namespace of its own (removed afterwards, Redis keys included), and the table format."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from farebox.settings import Settings  # noqa: E402
from tests.support.pipeline import (  # noqa: E402
    ALL_STAGES,
    ProcessPipeline,
    drop_namespace,
    drop_redis_prefix,
    settings_env,
)
from tests.support.workload import make_workload as make_workload  # noqa: E402  (re-exported for the scripts)

# bench/results/ is untracked (.gitignore), so a run never rewrites tracked files; run_all --smoke
# points this at a temporary folder, so a smoke run never overwrites the measured tables either.
RESULTS = Path(os.environ.get("FAREBOX_BENCH_RESULTS", ROOT / "bench" / "results"))


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        # As the servers bind (SO_REUSEADDR): connections of an earlier run in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@contextlib.contextmanager
def emulator_process(port: int, *, latency_ms: int = 0, batch_delay_s: float | None = None) -> Iterator[str]:
    # A port already taken (a `farebox up` or demo emulator on it) would let the bench measure a
    # foreign emulator without noticing, and count its CPU: refuse instead.
    if not port_is_free(port):
        raise SystemExit(f"port {port} is taken; stop whatever listens there before benchmarking")
    proc = subprocess.Popen(
        [sys.executable, "-m", "farebox", "emulator", "--port", str(port), "--latency-ms", str(latency_ms)]
        + ([] if batch_delay_s is None else ["--batch-delay-s", str(batch_delay_s)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.asynccontextmanager
async def process_pipeline(
    emulator_url: str,
    child_env: dict[str, str] | None = None,
    runner: Sequence[str] = ("-m", "farebox"),
    **overrides: Any,
) -> AsyncIterator[tuple[Settings, ProcessPipeline]]:
    """Every stage as its own OS process, as `farebox up` runs them (settings overrides reach them
    through the environment; ``child_env`` adds to it, e.g. PYTHONPATH to run another checkout's stages;
    ``runner``: what runs ``worker STAGE``, a wrapper of farebox's command line such as bench/hop_trace.py)."""
    run = uuid.uuid4().hex[:8]
    settings = Settings(
        namespace=f"fbbench-{run}",
        redis_prefix=f"fbbench:{run}:",
        metrics_port=0,
        emulator_url=emulator_url,
        **overrides,
    )
    procs = ProcessPipeline(settings)
    procs.env.update(child_env or {})
    procs.start(ALL_STAGES, runner=runner)
    try:
        yield settings, procs
    finally:
        procs.terminate()
        await drop_namespace(settings)
        await drop_redis_prefix(settings)


async def wait_for_emulator() -> None:
    await asyncio.sleep(2)


def spread(xs: Sequence[float], spec: str) -> str:
    """Median with min and max, as every multi-run figure is shown."""
    return f"{statistics.median(xs):{spec}} (min {min(xs):{spec}}, max {max(xs):{spec}})"


def percentile(sorted_values: Sequence[float], p: float) -> float:
    return sorted_values[max(0, int(len(sorted_values) * p) - 1)]


def publish_table(name: str, table: str) -> None:
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(table)


def cores() -> int:
    return os.cpu_count() or 1


# --- process accounting from Linux /proc (no psutil in the project's dependencies) -------------------------------
def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def peak_rss_mb(pid: int) -> float:
    """The most resident memory the process has had (VmHWM), MiB."""
    return _status_kb(pid, "VmHWM") / 1024


def rss_mb(pid: int) -> float:
    """Resident memory now (VmRSS), MiB."""
    return _status_kb(pid, "VmRSS") / 1024


def process_tree(root: int) -> list[int]:
    """root and every descendant alive now (uvicorn workers, multiprocessing children)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def pids_of(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def broker_pids() -> list[int]:
    # The RabbitMQ server's Erlang VM only: rabbitmqctl and rabbitmq-diagnostics run short-lived beam.smp
    # processes too, and one exiting mid-run would fail the measurement.
    return pids_of(r"beam\.smp .*-s rabbit boot")


def redis_pids() -> list[int]:
    """The redis-server that FAREBOX_REDIS_URL (or the default) points at, found by its port."""
    port = urlsplit(Settings().redis_url).port or 6379
    return pids_of(f"redis-server .*:{port}( |$)")


class CpuGroups:
    """CPU used by named groups of processes from construction to per_job_ms(). The baseline is per
    process, so a process that exits mid-run cannot make a group's figure low or negative: it
    fails the measurement instead."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.before = {pid: cpu_s(pid) for pids in groups.values() for pid in pids}

    def per_job_ms(self, n: int) -> dict[str, float]:
        out = {}
        for name, pids in self.groups.items():
            try:
                used = sum(cpu_s(pid) - self.before[pid] for pid in pids)
            except OSError as err:
                raise SystemExit(f"a {name} process exited during the measurement ({err})") from err
            out[name] = used * 1000 / n
        return out


def child_imports(child_env: dict[str, str] | None) -> list[str]:
    """Where a stage child (same environment, same working directory) imports farebox from."""
    env = settings_env(Settings())
    env.update(child_env or {})
    code = "import farebox, farebox.stages.main as m; print(farebox.__file__); print(m.__file__)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return done.stdout.split()


def check_imports(tree: Path) -> str:
    """The stages are started as ``python -m farebox`` in this process's working directory, which comes first on
    their sys.path: from /work/main it would shadow PYTHONPATH and 'before' would run today's code. So a script
    comparing two checkouts works from an empty folder (``os.chdir`` first), and checks both sides import what
    they should. Returns where the other side's farebox is."""
    old = child_imports({"PYTHONPATH": str(tree)})
    if not old or not all(f.startswith(str(tree) + "/") for f in old):
        raise SystemExit(f"the 'before' child imports farebox from {old}, not {tree}")
    new = child_imports(None)
    if not new or not all(f.startswith(str(ROOT) + "/") for f in new):
        raise SystemExit(f"today's child imports farebox from {new}, not {ROOT}")
    return old[0]
