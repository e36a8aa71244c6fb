"""`farebox report --since`: only a real YYYY-MM-DD day is taken. Days are compared as strings with the ledger's
day keys, so "12/01/2026" once selected every day and "yesterday" none, both with exit 0."""

from __future__ import annotations

import json

import pytest
from redis import Redis

from farebox.cli import build_parser, main
from farebox.constants import RedisKeys
from farebox.errors import InvalidRequest
from farebox.report import load_rows, parse_day
from farebox.settings import Settings


@pytest.mark.parametrize("text", ["2026-12-01", "2024-02-29", "1999-01-31"])
def test_parse_day_takes_iso_days(text: str) -> None:
    assert parse_day(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "12/01/2026",
        "yesterday",
        "today",
        "20261201",  # date.fromisoformat takes it, the ledger's keys do not look like it
        "2026-W48-2",
        "2026-12-1",
        "2026-13-01",
        "2025-02-29",
        " 2026-12-01",
        "2026-12-01T00:00",
        "",
    ],
)
def test_parse_day_refuses_the_rest(text: str) -> None:
    with pytest.raises(InvalidRequest) as exc_info:
        parse_day(text)
    assert str(exc_info.value) == f"{text!r} is not a date; give the first UTC day as YYYY-MM-DD, e.g. 2026-12-01"


@pytest.mark.parametrize("text", ["12/01/2026", "yesterday"])
def test_cli_refuses_a_bad_since_with_exit_2(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["report", "--since", text])
    assert exc_info.value.code == 2
    err = capsys.readouterr().err
    assert f"farebox report: error: argument --since: {text!r} is not a date" in err and "YYYY-MM-DD" in err


def seed_ledger(settings: Settings) -> None:
    keys = settings.keys
    client = Redis.from_url(settings.redis_url)
    try:
        for day, jobs in (("2026-11-30", 2), ("2026-12-01", 3)):
            client.sadd(keys.ledger_days, day)
            client.hset(keys.ledger_agg(day), mapping={"acme|openai|gpt-4o-mini|jobs": jobs})
    finally:
        client.close()


@pytest.mark.parametrize(("since", "jobs"), [(None, 5), ("2026-11-30", 5), ("2026-12-01", 3), ("2026-12-02", 0)])
def test_cli_since_selects_days(
    settings: Settings, capsys: pytest.CaptureFixture[str], since: str | None, jobs: int
) -> None:
    seed_ledger(settings)
    args = build_parser().parse_args(["report", "--json", *(["--since", since] if since else [])])
    assert args.func(args, settings) == 0
    assert json.loads(capsys.readouterr().out)["total"]["jobs"] == jobs


async def test_load_rows_refuses_a_bad_since() -> None:
    # A caller of the library gets the same typed error as the command line, before any Redis call.
    with pytest.raises(InvalidRequest, match="'yesterday' is not a date"):
        await load_rows(None, RedisKeys("unused:"), by=("day",), since="yesterday")  # type: ignore[arg-type]
