"""What counts as the broker being away: aiormq's and aio-pika's errors, and a bare RuntimeError only
while the connection really is closed or reconnecting (a bug must fail, not be retried for ever)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import aiormq
import pytest

from farebox.errors import broker_away
from farebox.settings import Settings
from farebox.stages import runtime


@pytest.mark.parametrize(
    ("err", "closed", "reconnecting", "away"),
    [
        (aiormq.exceptions.AMQPConnectionError(), False, False, True),
        (aiormq.exceptions.ChannelInvalidStateError(), False, False, True),
        (ConnectionResetError(), False, False, True),
        (RuntimeError("connection closed"), True, False, True),
        (RuntimeError("reconnecting right now"), False, True, True),
        (RuntimeError("a bug"), False, False, False),
        (ValueError("a bug"), True, True, False),
        (KeyError("x"), True, False, False),
    ],
)
def test_broker_away(err: BaseException, closed: bool, reconnecting: bool, away: bool) -> None:
    assert broker_away(err, SimpleNamespace(is_closed=closed, reconnecting=reconnecting)) is away


class FlakyConnection:
    """``channel()`` fails with the given errors in turn, then with a sentinel that ends the test."""

    def __init__(self, errors: list[BaseException], *, is_closed: bool) -> None:
        self.errors = errors
        self.is_closed = is_closed
        self.reconnecting = False
        self.calls = 0

    async def channel(self, **_: Any) -> None:
        self.calls += 1
        raise self.errors.pop(0) if self.errors else LookupError("the end")


class Core:
    name = "dedup"

    def input_queues(self) -> list[str]:
        return []


async def test_a_stage_start_retries_a_closed_connections_runtime_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_sleep = asyncio.sleep

    async def no_sleep(_: float) -> None:
        await real_sleep(0)

    monkeypatch.setattr(runtime.asyncio, "sleep", no_sleep)
    worker = runtime.Worker(Settings(), Core(), [])  # type: ignore[arg-type]
    closed = FlakyConnection([RuntimeError("closed"), RuntimeError("closed")], is_closed=True)
    with pytest.raises(LookupError):
        await worker._start(closed)  # type: ignore[arg-type]
    assert closed.calls == 3
    open_one = FlakyConnection([RuntimeError("a bug")], is_closed=False)
    with pytest.raises(RuntimeError, match="a bug"):
        await worker._start(open_one)  # type: ignore[arg-type]
    assert open_one.calls == 1
