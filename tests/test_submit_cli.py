"""``farebox submit`` (and ``ask``) as people meet them: usage errors in one line with exit 2, exit
codes that say whether every job ended ok, a summary whose numbers add up on a resume, Ctrl-C
keeping what was written and saying how to resume, and a word when no pipeline is running."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import aio_pika
import pytest

import farebox.submit
from farebox.cli import main
from farebox.schemas import JobResult
from farebox.settings import Settings
from farebox.submit import Answered, Summary, _id_hash, read_lines, stable_job_id, submit
from tests.support.pipeline import InProcessPipeline, settings_env

NO_PIPELINE = "nothing is consuming queue"


def write_lines(path: Path, *lines: object) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def answered(path: Path, *results: JobResult) -> Path:
    path.write_text("".join(r.model_dump_json(exclude_none=True) + "\n" for r in results))
    return path


def ok(job_id: str) -> JobResult:
    return JobResult(job_id=job_id, status="ok")


# --- usage errors: one line on stderr, exit 2 ------------------------------------------------
def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["submit", *argv])
    return code, capsys.readouterr().err


def test_a_missing_input_file_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, str(tmp_path / "MISSING.jsonl"))
    assert code == 2
    assert err.strip().splitlines() == [
        f"farebox: error invalid_request: cannot read {tmp_path / 'MISSING.jsonl'}: No such file or directory"
    ]


def test_an_input_that_cannot_be_read_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, str(tmp_path))  # a directory
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot read" in err


@pytest.mark.parametrize("where", ["missing-dir/out.jsonl", "a-dir"])
def test_an_output_that_cannot_be_written_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    jobs = write_lines(tmp_path / "jobs.jsonl", {"prompt": "hi"})
    (tmp_path / "a-dir").mkdir()
    code, err = run_cli(capsys, str(jobs), "-o", str(tmp_path / where))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(tmp_path / where) in err and "Traceback" not in err


def test_the_input_as_its_own_output_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = write_lines(tmp_path / "jobs.jsonl", {"prompt": "hi"})
    code, err = run_cli(capsys, str(jobs), "-o", str(jobs))
    assert code == 2 and "is the input file" in err
    assert jobs.read_text() == '{"prompt": "hi"}\n'


def test_a_max_in_flight_below_1_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["submit", str(tmp_path / "jobs.jsonl"), "--max-in-flight", "0"])
    assert exited.value.code == 2


def test_help_and_docstring_give_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["submit", "--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    doc = farebox.submit.__doc__ or ""
    for code, meaning in [
        ("0", "every job ended ok"),
        ("1", "a job ended in an error result"),
        ("2", "usage or configuration error"),
        ("130", "interrupted (Ctrl-C)"),
    ]:
        line = re.compile(rf"^ +{code} +{re.escape(meaning)}", re.MULTILINE)
        assert line.search(shown) and line.search(doc), code


# --- exit codes and counting -----------------------------------------------------------------
@pytest.mark.parametrize(
    "counts, code",
    [
        ({"ok": 3}, 0),
        ({"ok": 3, "skipped": 2}, 0),
        ({"ok": 2, "errors": 1}, 1),
        ({"ok": 3, "invalid": 1}, 1),
        ({"ok": 3, "skipped": 2, "skipped_errors": 1}, 1),
        ({"ok": 3, "interrupted": True}, 130),
        ({"errors": 3, "interrupted": True}, 130),
    ],
)
def test_exit_code(counts: dict[str, int], code: int) -> None:
    assert Summary(**counts).exit_code == code  # type: ignore[arg-type]


def test_every_line_is_counted_once_on_a_resume(tmp_path: Path) -> None:
    bad_json, bad_job = "not json", '{"prompt": "x", "qualty": "high"}'
    jobs = write_lines(
        tmp_path / "jobs.jsonl",
        {"prompt": "done", "job_id": "done-1"},
        {"prompt": "failed before", "job_id": "failed-1"},
        bad_json,
        "",
        bad_job,
        {"prompt": "new", "job_id": "new-1"},
        {"prompt": "no id yet"},
        {"prompt": "null id", "job_id": None},
    )
    known = Answered(
        ids={_id_hash(i) for i in ("done-1", "failed-1", stable_job_id(3, bad_json))},
        failed={_id_hash(i) for i in ("failed-1", stable_job_id(3, bad_json))},
    )
    summary = Summary()
    items = list(read_lines(jobs, known, summary))
    sent = [i.job_id for i in items if not isinstance(i, JobResult) and i is not None]
    recorded = [i for i in items if isinstance(i, JobResult)]
    assert sent == [
        "new-1",
        stable_job_id(7, '{"prompt": "no id yet"}'),
        stable_job_id(8, '{"prompt": "null id", "job_id": null}'),
    ]
    # The bad line already in the output is not written again; the new one is.
    assert [r.job_id for r in recorded] == [stable_job_id(5, bad_job)]
    assert recorded[0].error is not None and "line 5" in recorded[0].error.message
    assert (summary.lines, summary.skipped, summary.skipped_errors, summary.invalid, summary.sent) == (7, 2, 1, 2, 3)
    assert summary.skipped + summary.sent + summary.invalid == summary.lines


def test_an_output_file_that_cannot_be_read_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_lines(tmp_path / "jobs.jsonl", {"prompt": "hi"})
    out = tmp_path / "out.jsonl"
    answered(out, ok("x"))
    out.chmod(0o200)
    if os.access(out, os.R_OK):  # root reads it anyway: a directory cannot be read as lines either way
        out.unlink()
        out.mkdir()
    code, err = run_cli(capsys, str(jobs), "-o", str(out))
    assert code == 2 and "cannot read" in err and "to skip the jobs it holds" in err


# --- against the pipeline ----------------------------------------------------------------------
async def test_a_run_and_its_resume_add_up_and_say_what_failed(
    pipeline: InProcessPipeline, settings: Settings, tmp_path: Path
) -> None:
    await pipeline.start()
    jobs = write_lines(
        tmp_path / "jobs.jsonl",
        {"prompt": "one", "job_id": "r-1"},
        {"prompt": "two", "job_id": "r-2", "model": "openai/no-such-model"},
        "not json",
        {"prompt": "three"},
    )
    out = tmp_path / "out.jsonl"
    first = await submit(settings, jobs, out, quiet=True)
    assert (first.lines, first.skipped, first.invalid, first.sent) == (4, 0, 1, 3)
    assert (first.ok, first.errors, first.exit_code) == (2, 1, 1)
    assert len(out.read_text().splitlines()) == 4  # three results and the invalid line's

    again = await submit(settings, jobs, out, quiet=True)
    assert (again.lines, again.skipped, again.skipped_errors, again.invalid, again.sent) == (4, 3, 1, 1, 0)
    assert again.skipped + again.sent + again.invalid == again.lines
    assert again.exit_code == 1  # the output still holds an error
    assert len(out.read_text().splitlines()) == 4  # nothing written twice


async def cli(settings: Settings, *argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "farebox",
        *argv,
        env=settings_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=ctrl_c_as_at_a_terminal,
    )


def ctrl_c_as_at_a_terminal() -> None:
    # A test run started in the background ignores SIGINT, and a child would inherit that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def test_the_exit_code_is_1_when_a_job_failed_and_0_when_all_are_ok(
    pipeline: InProcessPipeline, settings: Settings, tmp_path: Path
) -> None:
    await pipeline.start()
    runs = [
        (write_lines(tmp_path / "bad.jsonl", {"prompt": "fine", "job_id": "c-1"}, "not json"), 1),
        (write_lines(tmp_path / "good.jsonl", {"prompt": "fine", "job_id": "c-2"}), 0),
    ]
    for jobs, expected in runs:
        proc = await cli(settings, "submit", str(jobs), "-o", str(jobs.with_suffix(".out")), "--quiet")
        _, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == expected, err.decode()
        assert NO_PIPELINE not in err.decode()


# --- Ctrl-C and no pipeline --------------------------------------------------------------------
class Stderr:
    """A child's stderr, read as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        self.stream = proc.stderr
        self.text = ""

    async def until(self, needle: str, within_s: float) -> float:
        started = time.monotonic()
        while needle not in self.text:
            line = await asyncio.wait_for(self.stream.readline(), max(within_s - (time.monotonic() - started), 0.01))
            assert line, f"stderr ended without {needle!r}:\n{self.text}"
            self.text += line.decode()
        return time.monotonic()

    async def rest(self) -> str:
        self.text += (await self.stream.read()).decode()
        return self.text


async def held(settings: Settings) -> int:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        queue = await (await connection.channel()).declare_queue(settings.topology.intake, passive=True)
        return queue.declaration_result.message_count or 0


async def test_ctrl_c_prints_the_summary_so_far_and_how_to_resume(
    settings: Settings, bare_intake: aio_pika.abc.AbstractQueue, tmp_path: Path
) -> None:
    jobs = write_lines(
        tmp_path / "jobs.jsonl",
        {"prompt": "done before", "job_id": "i-1"},
        "not json",
        {"prompt": "a", "job_id": "i-2"},
        {"prompt": "b", "job_id": "i-3"},
    )
    out = answered(tmp_path / "out.jsonl", ok("i-1"))
    summary_json = tmp_path / "summary.json"
    proc = await cli(settings, "submit", str(jobs), "-o", str(out), "--summary-json", str(summary_json))
    stderr = Stderr(proc)
    try:
        await stderr.until(NO_PIPELINE, 30)
        for _ in range(200):  # both jobs published (and held, nobody consumes them)
            if await held(settings) == 2:
                break
            await asyncio.sleep(0.05)
        assert await held(settings) == 2
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 130
    finally:
        if proc.returncode is None:
            proc.kill()
    err = await stderr.rest()
    assert f"resume: farebox submit {jobs} -o {out}" in err
    assert "farebox submit (interrupted)" in err and "Traceback" not in err
    summary = json.loads(summary_json.read_text())
    assert summary["interrupted"] is True and summary["exit_code"] == 130
    counts = {k: summary[k] for k in ("lines", "skipped", "invalid", "sent", "jobs")}
    assert counts == {"lines": 4, "skipped": 1, "invalid": 1, "sent": 2, "jobs": 0}
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert kept[0]["status"] == "ok"  # what the earlier run wrote is kept as it was
    assert [r["job_id"] for r in kept] == ["i-1", stable_job_id(2, "not json")]  # the invalid line's record stays


async def test_ctrl_c_without_an_output_file_says_there_is_nothing_to_resume(
    settings: Settings, tmp_path: Path
) -> None:
    jobs = write_lines(tmp_path / "jobs.jsonl", {"prompt": "a"})
    proc = await cli(settings, "submit", str(jobs))  # no pipeline, not even its intake
    stderr = Stderr(proc)
    try:
        await stderr.until(NO_PIPELINE, 30)
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 130
    finally:
        if proc.returncode is None:
            proc.kill()
    err = await stderr.rest()
    assert "Nothing to resume from" in err and "-o OUT.jsonl" in err and "Traceback" not in err


async def test_ask_says_no_pipeline_is_running_then_waits_until_its_timeout(settings: Settings) -> None:
    timeout_s = 8.0
    started = time.monotonic()
    proc = await cli(settings, "ask", "hi", "--timeout", str(timeout_s))
    stderr = Stderr(proc)
    try:
        warned = await stderr.until(NO_PIPELINE, timeout_s)
        assert "`farebox up`" in stderr.text
        assert await asyncio.wait_for(proc.wait(), timeout_s + 30) == 2
    finally:
        if proc.returncode is None:
            proc.kill()
    ended = time.monotonic()
    assert timeout_s <= ended - started < timeout_s + 15  # waited for a pipeline until --timeout, not 30 s
    assert ended - warned >= 2  # and said so long before giving up
    assert "does not exist" in await stderr.rest()
