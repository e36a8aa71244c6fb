"""``farebox submit FILE.jsonl [-o OUT.jsonl]``: stream a job file through the pipeline.

The input is read line by line (a million-line file is never held in memory). A line without a
job_id gets a stable one from its line number and content, so re-running the same command with
the same output file skips every job already answered there; a job answered by the pipeline but
not yet written when the run stopped is replayed from the result store without a second charge.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from farebox.client import FareboxClient, as_job
from farebox.errors import InvalidRequest
from farebox.schemas import ErrorInfo, Job, JobResult
from farebox.settings import Settings


@dataclass
class Summary:
    jobs: int = 0
    ok: int = 0
    errors: int = 0
    cache_hits: int = 0
    cost_usd: float = 0.0
    baseline_cost_usd: float = 0.0
    skipped: int = 0
    elapsed_s: float = 0.0

    def add(self, result: JobResult) -> None:
        self.jobs += 1
        if result.status == "ok":
            self.ok += 1
        else:
            self.errors += 1
        if result.cache in ("hit", "coalesced"):
            self.cache_hits += 1
        self.cost_usd += result.cost_usd
        self.baseline_cost_usd += result.baseline_cost_usd

    @property
    def savings_usd(self) -> float:
        return self.baseline_cost_usd - self.cost_usd

    def table(self) -> Table:
        t = Table(title="farebox submit", show_header=False)
        saved_pct = 100 * self.savings_usd / self.baseline_cost_usd if self.baseline_cost_usd else 0.0
        rows = [
            ("jobs", f"{self.jobs}"),
            ("ok", f"{self.ok}"),
            ("errors", f"{self.errors}"),
            ("cache hits (hit + coalesced)", f"{self.cache_hits}"),
            ("skipped (already in output)", f"{self.skipped}"),
            ("cost", f"${self.cost_usd:.6f}"),
            ("baseline cost", f"${self.baseline_cost_usd:.6f}"),
            ("savings", f"${self.savings_usd:.6f} ({saved_pct:.1f}%)"),
            ("elapsed", f"{self.elapsed_s:.1f}s"),
            ("throughput", f"{self.jobs / self.elapsed_s:.1f} jobs/s" if self.elapsed_s else "-"),
        ]
        for k, v in rows:
            t.add_row(k, v)
        return t

    def as_dict(self) -> dict[str, float | int]:
        return {
            "jobs": self.jobs,
            "ok": self.ok,
            "errors": self.errors,
            "cache_hits": self.cache_hits,
            "skipped": self.skipped,
            "cost_usd": self.cost_usd,
            "baseline_cost_usd": self.baseline_cost_usd,
            "savings_usd": self.savings_usd,
            "elapsed_s": self.elapsed_s,
        }


def _id_hash(job_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(job_id.encode(), digest_size=8).digest(), "big")


def stable_job_id(line_no: int, line: str) -> str:
    return f"l{line_no}-{hashlib.sha256(line.encode()).hexdigest()[:16]}"


def answered_ids(out: Path) -> set[int]:
    """Hashes of job ids already in the output file (8 bytes each, so a big file stays cheap)."""
    seen: set[int] = set()
    if out.exists():
        with out.open(encoding="utf-8") as f:
            for line in f:
                try:
                    seen.add(_id_hash(json.loads(line)["job_id"]))
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by an interrupted run: its job is resubmitted
    return seen


def read_jobs(path: Path, skip: set[int], bad: list[JobResult], summary: Summary) -> Iterator[Job]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            try:
                data = json.loads(text)
                if not isinstance(data, dict):
                    raise InvalidRequest("a line must be a JSON object")
                if "job_id" not in data:  # hashing every line only for the ones without an id
                    data["job_id"] = stable_job_id(line_no, text)
                job = as_job(data)
            except (ValueError, InvalidRequest) as err:
                job_id = stable_job_id(line_no, text)
                if _id_hash(job_id) not in skip:
                    msg = (
                        f"line {line_no}: {err}"
                        if isinstance(err, InvalidRequest)
                        else f"line {line_no}: not valid JSON"
                    )
                    bad.append(
                        JobResult(job_id=job_id, status="error", error=ErrorInfo(code="invalid_request", message=msg))
                    )
                continue
            assert job.job_id is not None
            if _id_hash(job.job_id) in skip:
                summary.skipped += 1
                continue
            yield job


def count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


async def submit(
    settings: Settings,
    path: Path,
    out: Path | None,
    *,
    max_in_flight: int = 256,
    quiet: bool = False,
    console: Console | None = None,
) -> Summary:
    console = console or Console(stderr=True)
    summary = Summary()
    skip = answered_ids(out) if out else set()
    total = None if quiet else count_lines(path)  # a second pass over the file, for the progress bar only
    bad: list[JobResult] = []
    sink: IO[str] = out.open("a", encoding="utf-8") if out else sys.stdout
    started = time.monotonic()
    progress = Progress(
        TextColumn("[bold]submit"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=quiet,
        transient=False,
    )
    try:
        with progress:
            bar = progress.add_task("jobs", total=total, status="")

            def write(result: JobResult) -> None:
                sink.write(result.model_dump_json(exclude_none=True) + "\n")
                summary.add(result)
                progress.update(bar, advance=1, status=f"${summary.cost_usd:.4f} {summary.cache_hits} hits")

            async def jobs() -> AsyncIterator[Job]:
                for job in read_jobs(path, skip, bad, summary):
                    while bad:
                        write(bad.pop())
                    yield job
                progress.update(bar, advance=summary.skipped)

            async with FareboxClient.from_settings(settings) as client:
                async for result in client.stream(jobs(), max_in_flight=max_in_flight):
                    write(result)
            for result in bad:
                write(result)
    finally:
        if out:
            sink.close()
        else:
            sink.flush()
    summary.elapsed_s = time.monotonic() - started
    if not quiet:
        console.print(summary.table())
    return summary
