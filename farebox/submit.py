"""``farebox submit FILE.jsonl [-o OUT.jsonl]``: stream a job file through the pipeline.

The input is read line by line (a million-line file is never held in memory). A line without a
job_id gets a stable one from its line number and content, so re-running the same command with
the same output file skips every job already answered there; a job answered by the pipeline but
not yet written when the run stopped is replayed from the result store without a second charge.
A line that fails here (not JSON, not a valid job) gets an ``invalid_request`` result in the
output. Every non-empty line is counted once in the summary: skipped (already in the output),
invalid, or sent.

Exit codes:

    0    every job ended ok
    1    a job ended in an error result (in this run, or already in the output when resuming),
         or a line failed locally (not JSON, not a valid job)
    2    usage or configuration error: bad arguments, FILE unreadable, OUT not writable, the
         broker unreachable, no pipeline's intake queue within 30 s
    130  interrupted (Ctrl-C): the summary so far and how to resume are printed
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shlex
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from redis.exceptions import RedisError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from farebox.client import FareboxClient, as_job
from farebox.errors import InvalidRequest
from farebox.redis_connect import connect_redis
from farebox.routing.catalog import load_catalog
from farebox.schemas import ErrorInfo, Job, JobResult
from farebox.schemas.job import PriceLane, Priority
from farebox.settings import Settings
from farebox.stages.batch_store import lane_progress

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# Lines read between two yields to the event loop while none of them is sent (a resume skipping
# a long answered stretch must not hold up the results arriving meanwhile).
LINES_PER_TURN = 1024
BATCH_WATCH_S = 2.0  # how often `submit --lane batch` reads what the batch lane holds


@dataclass
class Summary:
    """Every non-empty line is one of skipped, invalid or sent; every sent job, once answered, one
    of ok or errors."""

    lines: int = 0
    skipped: int = 0
    skipped_errors: int = 0  # of the skipped, those whose result in the output is an error
    invalid: int = 0
    sent: int = 0
    ok: int = 0
    errors: int = 0
    cache_hits: int = 0
    cost_usd: float = 0.0
    baseline_cost_usd: float = 0.0
    elapsed_s: float = 0.0
    interrupted: bool = False

    def add(self, result: JobResult) -> None:
        if result.status == "ok":
            self.ok += 1
        else:
            self.errors += 1
        if result.cache in ("hit", "coalesced"):
            self.cache_hits += 1
        self.cost_usd += result.cost_usd
        self.baseline_cost_usd += result.baseline_cost_usd

    @property
    def answered(self) -> int:
        return self.ok + self.errors

    @property
    def settled(self) -> int:
        """Lines with nothing left to wait for (the progress bar's count)."""
        return self.skipped + self.invalid + self.answered

    @property
    def savings_usd(self) -> float:
        return self.baseline_cost_usd - self.cost_usd

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if self.errors or self.invalid or self.skipped_errors else EXIT_OK

    def table(self) -> Table:
        t = Table(title="farebox submit (interrupted)" if self.interrupted else "farebox submit", show_header=False)
        saved_pct = 100 * self.savings_usd / self.baseline_cost_usd if self.baseline_cost_usd else 0.0
        skipped = f"{self.skipped}" + (f" ({self.skipped_errors} with an error result)" if self.skipped_errors else "")
        rows = [
            ("lines", f"{self.lines}"),
            ("  skipped (already in output)", skipped),
            ("  invalid lines", f"{self.invalid}"),
            ("  sent", f"{self.sent}"),
            ("answered", f"{self.answered}"),
            ("  ok", f"{self.ok}"),
            ("  errors", f"{self.errors}"),
        ]
        if self.sent > self.answered:
            rows.append(("  not answered yet", f"{self.sent - self.answered}"))
        rows += [
            ("cache hits (hit + coalesced)", f"{self.cache_hits}"),
            ("cost", f"${self.cost_usd:.6f}"),
            ("baseline cost", f"${self.baseline_cost_usd:.6f}"),
            ("savings", f"${self.savings_usd:.6f} ({saved_pct:.1f}%)"),
            ("elapsed", f"{self.elapsed_s:.1f}s"),
            ("throughput", f"{self.answered / self.elapsed_s:.1f} jobs/s" if self.elapsed_s else "-"),
        ]
        for k, v in rows:
            t.add_row(k, v)
        return t

    def as_dict(self) -> dict[str, float | int | bool]:
        return {
            "lines": self.lines,
            "skipped": self.skipped,
            "skipped_errors": self.skipped_errors,
            "invalid": self.invalid,
            "sent": self.sent,
            "jobs": self.answered,
            "ok": self.ok,
            "errors": self.errors,
            "cache_hits": self.cache_hits,
            "cost_usd": self.cost_usd,
            "baseline_cost_usd": self.baseline_cost_usd,
            "savings_usd": self.savings_usd,
            "elapsed_s": self.elapsed_s,
            "interrupted": self.interrupted,
            "exit_code": self.exit_code,
        }


def resume_hint(path: str, out: str | None) -> str:
    """What to tell someone who stopped a run (``path`` and ``out`` as they typed them)."""
    if out is None:
        return (
            "interrupted. Nothing to resume from: without -o the results went to stdout only. "
            f"Run it again with an output file to make it resumable: farebox submit {shlex.quote(path)} -o OUT.jsonl"
        )
    return (
        f"interrupted; the results written so far are kept in {out}. Run the same command to send the rest:\n"
        f"resume: farebox submit {shlex.quote(path)} -o {shlex.quote(out)}"
    )


@dataclass
class Answered:
    """Hashes of the job ids already in an output file (8 bytes each, so a big file stays cheap)."""

    ids: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)  # of ``ids``, those with an error result


def _id_hash(job_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(job_id.encode(), digest_size=8).digest(), "big")


def stable_job_id(line_no: int, line: str) -> str:
    return f"l{line_no}-{hashlib.sha256(line.encode()).hexdigest()[:16]}"


def answered_in(out: Path) -> Answered:
    answered = Answered()
    if not out.exists():
        return answered
    try:
        with out.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    h = _id_hash(record["job_id"])
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # a line cut short by an interrupted run: its job is resubmitted
                answered.ids.add(h)
                if record.get("status") != "ok":
                    answered.failed.add(h)
    except OSError as err:
        raise InvalidRequest(f"cannot read {out} (to skip the jobs it holds): {err.strerror or err}") from None
    return answered


def with_lane(job: Job, lane: PriceLane | None) -> Job:
    """``job`` on the price lane ``lane`` (``--lane``) unless it names its own (or ``lane`` is None)."""
    if lane is None or job.lane is not None:
        return job
    return job.model_copy(update={"lane": lane})


def parse_line(line_no: int, text: str, lane: PriceLane | None = None) -> Job:
    """The job on one line (InvalidRequest or ValueError when there is none), on ``lane`` when it names none.
    The job_id of a line without one hashes the line as written, so ``--lane`` does not change it."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise InvalidRequest("a line must be a JSON object")
    if data.get("job_id") is None:  # hashing every line only for the ones without an id
        data["job_id"] = stable_job_id(line_no, text)
    return with_lane(as_job(data), lane)


def invalid_line(job_id: str, line_no: int, err: Exception) -> JobResult:
    msg = f"line {line_no}: {err}" if isinstance(err, InvalidRequest) else f"line {line_no}: not valid JSON"
    return JobResult(job_id=job_id, status="error", error=ErrorInfo(code="invalid_request", message=msg))


def read_lines(
    path: Path, answered: Answered, summary: Summary, lane: PriceLane | None = None
) -> Iterator[Job | JobResult | None]:
    """For every non-empty line, counted in ``summary``: its Job to send; the error result of a
    line that fails here (once: not again when the output has it); None when it is skipped."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            summary.lines += 1
            try:
                job = parse_line(line_no, text, lane)
            except (ValueError, InvalidRequest) as err:
                summary.invalid += 1
                job_id = stable_job_id(line_no, text)
                yield None if _id_hash(job_id) in answered.ids else invalid_line(job_id, line_no, err)
                continue
            assert job.job_id is not None
            h = _id_hash(job.job_id)
            if h in answered.ids:
                summary.skipped += 1
                if h in answered.failed:
                    summary.skipped_errors += 1
                yield None
                continue
            summary.sent += 1
            yield job


def count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def check_paths(path: Path, out: Path | None) -> None:
    """Usage errors found before anything is sent."""
    try:
        with path.open("rb"):
            pass
    except OSError as err:
        raise InvalidRequest(f"cannot read {path}: {err.strerror or err}") from None
    if out is not None and out.exists() and out.samefile(path):
        raise InvalidRequest(f"-o {out} is the input file: results would be appended to the jobs being read")


def open_output(out: Path | None) -> IO[str]:
    if out is None:
        return sys.stdout
    try:
        return out.open("a", encoding="utf-8")
    except OSError as err:
        raise InvalidRequest(f"cannot write {out}: {err.strerror or err}") from None


async def watch_batches(settings: Settings, state: list[str], shown: Callable[[], None]) -> None:
    """Keep ``state[0]`` saying what the batch lane holds (queued for a batch, submitted as batch X); the jobs'
    results say when they are done. Best effort: Redis away leaves the line as it was."""
    providers = load_catalog(settings.catalog).providers()
    redis = connect_redis(settings.redis_url, socket_timeout=2.0)
    try:
        while True:
            with contextlib.suppress(RedisError, OSError):
                state[0] = (await lane_progress(redis, settings.keys, providers)).describe()
                shown()
            await asyncio.sleep(BATCH_WATCH_S)
    finally:
        await redis.aclose()


def progress_bar(console: Console, quiet: bool) -> Progress:
    return Progress(
        TextColumn("[bold]submit"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=quiet,
        transient=False,
    )


async def submit(
    settings: Settings,
    path: Path,
    out: Path | None,
    *,
    summary: Summary | None = None,
    max_in_flight: int = 256,
    quiet: bool = False,
    console: Console | None = None,
    priority: Priority | None = "background",
    lane: PriceLane | None = None,
) -> Summary:
    """Send the jobs of ``path`` not yet answered in ``out`` and append their results to it
    (stdout without ``out``). ``summary`` is filled as the run goes, so a caller holding it has
    the numbers so far when the run is interrupted. A backfill: background work unless a line (or
    ``priority``) says otherwise; ``lane`` the price lane of the jobs whose line names none."""
    console = console or Console(stderr=True)
    summary = summary if summary is not None else Summary()
    check_paths(path, out)
    answered = answered_in(out) if out else Answered()
    total = None if quiet else count_lines(path)  # a second pass over the file, for the progress bar only
    sink = open_output(out)
    started = time.monotonic()
    progress = progress_bar(console, quiet)

    def warn(message: str) -> None:
        console.print(f"farebox: warning: {message}", markup=False, highlight=False, soft_wrap=True)

    try:
        with progress:
            bar = progress.add_task("jobs", total=total, status="")

            batch_state = [""]  # what the batch lane holds, refreshed by watch_batches()

            def shown() -> None:
                status = " · ".join(filter(None, [f"${summary.cost_usd:.4f} {summary.cache_hits} hits", *batch_state]))
                progress.update(bar, completed=summary.settled, status=status)

            def write(result: JobResult) -> None:
                sink.write(result.model_dump_json(exclude_none=True) + "\n")

            async def jobs() -> AsyncIterator[Job]:
                for n, item in enumerate(read_lines(path, answered, summary, lane), 1):
                    if isinstance(item, Job):
                        yield item
                    elif item is not None:
                        write(item)
                    if n % LINES_PER_TURN == 0:
                        shown()
                        await asyncio.sleep(0)
                shown()

            client = FareboxClient.from_settings(settings, coalesce_writes=True, on_no_pipeline=warn)
            watcher = asyncio.create_task(watch_batches(settings, batch_state, shown)) if lane == "batch" else None
            try:
                async with client:
                    async for result in client.stream(jobs(), max_in_flight=max_in_flight, priority=priority):
                        write(result)
                        summary.add(result)
                        shown()
            finally:
                if watcher is not None:
                    watcher.cancel()
                    await asyncio.gather(watcher, return_exceptions=True)
    finally:
        if out:
            sink.close()
        else:
            sink.flush()
        summary.elapsed_s = time.monotonic() - started
    return summary
