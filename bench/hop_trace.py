"""Where one job's time goes, hop by hop. Every stage process is traced (when a message arrives, when its handling
ends, when its publishes are confirmed, when its ack is written), one job at a time, for fresh jobs and for cache
hits; the table gives each span's median over the jobs, with min and max over the runs. Prints the table and
writes bench/results/hop_trace.md.

    .venv/bin/python bench/hop_trace.py --jobs 200 --runs 3

The spans: ``handle`` a stage's decode and handling (its Redis round trips, routing, the provider call);
``confirm`` from the end of handling to its last publish confirmed; ``to <stage>`` from the previous stage's end of
handling (its publish sent) to this stage's delivery (the broker's routing and delivery, and the receiving
event loop's turn). The client's spans are its publish (to the confirm) and its reply's arrival.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import emulator_process, process_pipeline, publish_table, spread, wait_for_emulator

from farebox.client import FareboxClient
from farebox.patches import aiormq_writes

EMULATOR_PORT = 8097
SELF = str(Path(__file__).resolve())
STAGE_ORDER = ("dedup", "route", "execute", "account")


def trace_stage(out_dir: str, argv: list[str]) -> int:
    """Run ``farebox ARGV`` with the runtime's phases timed per job, written to OUT_DIR at exit."""
    from farebox.cli import main
    from farebox.stages import messages, runtime

    stage = argv[1]
    marks: list[tuple[str, str, float]] = []
    atexit.register(lambda: Path(out_dir, f"{stage}-{os.getpid()}.json").write_text(json.dumps(marks)))
    if os.environ.get("HOP_TRACE_PROFILE"):  # --profile: where each stage's CPU goes, by function
        profile = cProfile.Profile()
        profile.enable()

        def dump() -> None:
            profile.disable()
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
            Path(os.environ["HOP_TRACE_PROFILE"], f"{stage}-{os.getpid()}.txt").write_text(text.getvalue())

        atexit.register(dump)

    decide, publish, settle = runtime.Worker._decide, runtime.Worker._publish, messages.settle
    on_callback = runtime.Worker._callback

    def callback(self: Any, queue: str) -> Any:
        inner = on_callback(self, queue)

        async def on_message(message: Any) -> None:
            marks.append((str(message.message_id), "arrive", time.time()))
            await inner(message)

        return on_message

    async def decided(self: Any, delivery: Any) -> Any:
        verdict = await decide(self, delivery)
        marks.append((str(delivery.message_id), "handled", time.time()))
        return verdict

    async def published(self: Any, p: Any) -> None:
        await publish(self, p)
        marks.append((str(p.message_id), "confirmed", time.time()))

    async def settled(message: Any, **kwargs: Any) -> None:
        await settle(message, **kwargs)
        marks.append((str(message.message_id), "acked", time.time()))

    for owner, name in TIMED:
        setattr(owner_of(owner), name, timer(marks, f"{owner}.{name}", getattr(owner_of(owner), name)))
    runtime.Worker._callback = callback  # type: ignore[method-assign]
    runtime.Worker._decide = decided  # type: ignore[method-assign]
    runtime.Worker._publish = published  # type: ignore[method-assign]
    runtime.settle = settled  # type: ignore[assignment]
    return main(argv)


# What a stage's handling spends its time in, timed on every call (--timers prints their medians).
TIMED = (
    ("lua.NamedScript", "__call__"),
    ("dedup.DedupStage", "_state"),
    ("account.AccountStage", "finish"),
    ("account.Recorder", "record_and_reply"),
    ("ledger.Ledger", "record"),
    ("execute.ExecuteStage", "handle"),
    ("route.RouteStage", "handle"),
)


def owner_of(dotted: str) -> Any:
    import importlib

    module, _, cls = dotted.partition(".")
    return getattr(importlib.import_module(f"farebox.stages.{module}"), cls)


def timer(marks: list[tuple[str, str, float]], label: str, call: Any) -> Any:
    async def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return await call(*args, **kwargs)
        finally:
            name = getattr(args[0], "name", "") if label.startswith("lua") else ""
            marks.append((f"timer:{label} {name}".strip(), "took", time.perf_counter() - t))

    return timed


async def one_run(emulator: str, jobs: int, out_dir: str) -> dict[str, dict[str, float]]:
    """Median span per (kind, span) for one pipeline: fresh jobs, then hits of one cached prompt."""
    client_marks: dict[str, tuple[float, float, float]] = {}
    runner = (SELF, "stage", out_dir)
    async with (
        process_pipeline(emulator, runner=runner, batch_max=1) as (settings, _procs),
        FareboxClient.from_settings(settings, wait_for_pipeline_s=60) as client,
    ):
        await client.complete({"prompt": "warm up", "job_id": "warm", "task": "classify", "max_tokens": 5}, timeout=60)
        for kind, n in (("fresh", jobs), ("hit", jobs)):
            for i in range(n):
                job_id = f"{kind}-{i}"
                prompt = f"trace {settings.namespace} {i}" if kind == "fresh" else "warm up"
                job = {"prompt": prompt, "job_id": job_id, "task": "classify", "max_tokens": 5}
                t0 = time.time()
                waiter = asyncio.ensure_future(client.complete(job, timeout=60))
                await asyncio.sleep(0)
                result = await waiter
                client_marks[job_id] = (t0, result.latency_ms, time.time())
    marks = load_marks(out_dir)
    return spans(client_marks, marks)


def load_marks(out_dir: str) -> dict[tuple[str, str], dict[str, float]]:
    """(job_id, stage) -> phase -> time; the last of each phase (a stage's publishes: the last confirm)."""
    marks: dict[tuple[str, str], dict[str, float]] = {}
    for path in Path(out_dir).glob("*.json"):
        stage = path.name.split("-")[0]
        for job_id, phase, t in json.loads(path.read_text()):
            if job_id.startswith("timer:"):
                TIMERS.setdefault(f"{stage}: {job_id.removeprefix('timer:')}", []).append(t * 1000)
            else:
                marks.setdefault((job_id, stage), {})[phase] = t
        path.unlink()
    return marks


TIMERS: dict[str, list[float]] = {}


def spans(
    client: dict[str, tuple[float, float, float]], marks: dict[tuple[str, str], dict[str, float]]
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, list[float]]] = {}
    for job_id, (sent, _, received) in client.items():
        kind = job_id.split("-")[0]
        rows = out.setdefault(kind, {})
        previous = sent
        for stage in STAGE_ORDER:
            m = marks.get((job_id, stage))
            if not m or "arrive" not in m or "handled" not in m:
                continue
            rows.setdefault(f"to {stage}", []).append(m["arrive"] - previous)
            rows.setdefault(f"{stage} handle", []).append(m["handled"] - m["arrive"])
            if "confirmed" in m:
                rows.setdefault(f"{stage} confirm", []).append(m["confirmed"] - m["handled"])
            previous = m["handled"]
        rows.setdefault("to the caller", []).append(received - previous)
        rows.setdefault("total", []).append(received - sent)
    return {kind: {span: statistics.median(xs) * 1000 for span, xs in rows.items()} for kind, rows in out.items()}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    aiormq_writes.install()
    runs: list[dict[str, dict[str, float]]] = []
    with emulator_process(EMULATOR_PORT) as emulator, tempfile.TemporaryDirectory() as out_dir:
        await wait_for_emulator()
        for _ in range(a.runs):
            runs.append(await one_run(emulator, a.jobs, out_dir))
    lines = [
        f"# One job at a time, hop by hop ({a.runs} runs of {a.jobs} fresh jobs and {a.jobs} cache hits; ms)",
        "",
        "Each cell: the median over the jobs of a run, then the median (min, max) over the runs.",
        "",
        "| span | fresh job | cache hit |",
        "|---|---|---|",
    ]
    names = list(dict.fromkeys(name for run in runs for kind in run.values() for name in kind))
    for name in names:
        cells = []
        for kind in ("fresh", "hit"):
            xs = [run[kind][name] for run in runs if name in run.get(kind, {})]
            cells.append(spread(xs, ".2f") if xs else "-")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    lines += ["", "Calls timed inside the stages (every call of every run; ms):", "", "| call | calls | median | p90 |"]
    lines.append("|---|---|---|---|")
    for name, xs in sorted(TIMERS.items()):
        xs.sort()
        lines.append(f"| {name} | {len(xs)} | {statistics.median(xs):.3f} | {xs[int(len(xs) * 0.9)]:.3f} |")
    publish_table("hop_trace", "\n".join(lines) + "\n")


if __name__ == "__main__" and sys.argv[1:2] == ["stage"]:
    sys.exit(trace_stage(sys.argv[2], sys.argv[3:]))
elif __name__ == "__main__":
    asyncio.run(main())
