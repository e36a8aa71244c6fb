"""The stage processes' garbage collector, side by side in one run: farebox's settings (``FAREBOX_GC_FREEZE``,
``FAREBOX_GC_GEN0_THRESHOLD``) against Python's defaults, alternating, on the same workload (30% repeats, 1,000 in
flight, emulator at 0 ms). Each stage process carries a probe (a ``sitecustomize`` on its path) that adds up the
CPU time of its collections from the moment the load starts. Prints a table and writes bench/results/gc_probe.md.

    .venv/bin/python bench/gc_probe.py --jobs 3000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import tempfile
import time
from pathlib import Path

from common import CpuGroups, emulator_process, make_workload, process_pipeline, publish_table, spread

from farebox.client import FareboxClient

EMULATOR_PORT = 8092
# Loaded by every stage process (its folder is put first on PYTHONPATH): GC CPU time from SIGUSR1 to exit.
PROBE = """
import atexit, gc, json, os, signal, sys, time
_spent, _began = [0.0], [0.0]
def _timed(phase, info):
    if phase == "start":
        _began[0] = time.thread_time()
    else:
        _spent[0] += time.thread_time() - _began[0]
def _reset(*_):
    _spent[0] = 0.0
gc.callbacks.append(_timed)
signal.signal(signal.SIGUSR1, _reset)
atexit.register(lambda: open(os.path.join(os.environ["GC_PROBE_OUT"], f"{os.getpid()}.json"), "w").write(
    json.dumps({"gc_s": _spent[0]})))
"""
SIDES = {"farebox's settings": {}, "Python's defaults": {"gc_freeze": False, "gc_gen0_threshold": 0}}


def gc_seconds(folder: Path) -> float:
    return sum(json.loads(f.read_text())["gc_s"] for f in folder.glob("*.json"))


async def one_run(emulator: str, side: str, jobs: list[dict[str, object]], probe: Path) -> dict[str, float]:
    out = Path(tempfile.mkdtemp(prefix="fb-gc-out-"))
    env = {"PYTHONPATH": str(probe), "GC_PROBE_OUT": str(out)}
    async with (
        process_pipeline(emulator, child_env=env, **SIDES[side]) as (settings, procs),
        FareboxClient.from_settings(settings, wait_for_pipeline_s=60) as client,
    ):
        await client.complete({"prompt": "warm up"}, timeout=60)
        pids = [p.pid for p in procs.procs.values()]
        for pid in pids:
            os.kill(pid, signal.SIGUSR1)
        meter = CpuGroups({"stages": pids})
        tagged = [dict(j, job_id=f"{settings.namespace}-{i}") for i, j in enumerate(jobs)]
        t0 = time.perf_counter()
        async for _ in client.stream(tagged, max_in_flight=1000):
            pass
        rate = len(jobs) / (time.perf_counter() - t0)
        cpu_ms = meter.per_job_ms(len(jobs))["stages"]
    await asyncio.sleep(1)  # the stages' exit hooks have written
    gc_s = gc_seconds(out)
    return {"rate": rate, "cpu_ms": cpu_ms, "gc_share": 100 * gc_s * 1000 / len(jobs) / cpu_ms}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    probe = Path(tempfile.mkdtemp(prefix="fb-gc-probe-"))
    (probe / "sitecustomize.py").write_text(PROBE)
    jobs = make_workload(a.jobs, 0.3, seed=1)[0]
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    with emulator_process(EMULATOR_PORT) as emulator:
        await asyncio.sleep(2)
        for _ in range(a.runs):  # alternating, so drift on this noisy machine hits both alike
            for side in SIDES:
                runs[side].append(await one_run(emulator, side, jobs, probe))
    base = runs["Python's defaults"]
    ours = runs["farebox's settings"]
    lines = [
        f"# The stage processes' garbage collector ({a.runs} alternating runs of {a.jobs} jobs, 30% repeats, "
        "1,000 in flight)",
        "",
        "| measure | farebox's settings | Python's defaults | ratio, run by run |",
        "|---|---|---|---|",
    ]
    for key, label, spec in (
        ("rate", "jobs/s", ".0f"),
        ("cpu_ms", "stage CPU ms per job", ".2f"),
        ("gc_share", "collections' share of the stages' CPU, %", ".1f"),
    ):
        ratio = [o[key] / b[key] for o, b in zip(ours, base, strict=True)]
        mine, theirs = [r[key] for r in ours], [r[key] for r in base]
        lines.append(f"| {label} | {spread(mine, spec)} | {spread(theirs, spec)} | {spread(ratio, '.2f')} |")
    publish_table("gc_probe", "\n".join(lines) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
