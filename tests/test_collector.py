"""A stage process's garbage collector: frozen once the stage is built, its youngest generation collected less often
(farebox/stages/main.py ``settle_collector``; bench/gc_probe.py measures what it saves)."""

from __future__ import annotations

import asyncio
import inspect
import json
import signal
import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from farebox.settings import Settings
from farebox.stages import main as stage_main

SETTLE = """
import gc, json
from farebox.settings import Settings
from farebox.stages.main import settle_collector
before = gc.get_threshold()
settle_collector(Settings(**json.loads({overrides!r})))
print(json.dumps({{"frozen": gc.get_freeze_count(), "threshold": gc.get_threshold(), "before": before}}))
"""


def settled(overrides: dict[str, Any]) -> dict[str, Any]:
    code = SETTLE.format(overrides=json.dumps(overrides))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_a_stage_process_freezes_what_it_holds_and_collects_young_objects_less_often() -> None:
    got = settled({})
    assert got["frozen"] > 10_000  # the modules, schemas and settings of a started process
    assert got["threshold"] == [10_000, *got["before"][1:]]


@pytest.mark.parametrize(
    ("overrides", "frozen", "gen0"),
    [
        ({"gc_freeze": False}, False, 10_000),
        ({"gc_gen0_threshold": 0}, True, None),
        ({"gc_freeze": False, "gc_gen0_threshold": 0}, False, None),
        ({"gc_gen0_threshold": 50_000}, True, 50_000),
    ],
)
def test_the_settings_turn_each_part_off(overrides: dict[str, Any], frozen: bool, gen0: int | None) -> None:
    got = settled(overrides)
    assert (got["frozen"] > 0) == frozen
    assert got["threshold"][0] == (gen0 if gen0 is not None else got["before"][0])


def _own_sigterm_handler(signum: int, frame: object) -> None:
    """A caller's own handler, which the stage command must hand back."""


@pytest.mark.parametrize(
    "caller_handlers",
    [
        {},  # whatever the test run has
        {signal.SIGINT: signal.SIG_IGN},  # a run under nohup or started with & in a shell
        {signal.SIGTERM: _own_sigterm_handler, signal.SIGINT: signal.default_int_handler},
    ],
)
def test_the_stage_command_settles_its_process_and_a_pipeline_in_a_test_does_not(
    monkeypatch: pytest.MonkeyPatch, caller_handlers: dict[signal.Signals, Any]
) -> None:
    calls: list[dict[str, Any]] = []

    async def fake_run_stage(settings: Settings, stage: str, **kwargs: Any) -> None:
        calls.append({"stage": stage, **kwargs})

    real = stage_main.run_stage
    monkeypatch.setattr(stage_main, "run_stage", fake_run_stage)
    before = {sig: signal.getsignal(sig) for sig in stage_main.STOP_SIGNALS}
    try:
        for sig, handler in caller_handlers.items():
            signal.signal(sig, handler)
        handlers = {sig: signal.getsignal(sig) for sig in stage_main.STOP_SIGNALS}
        assert stage_main.worker_main(Settings(metrics_port=0), "dedup", None) == 0
        # Its event loop's SIGTERM and SIGINT handlers went with it, and the caller's own came back.
        assert {sig: signal.getsignal(sig) for sig in stage_main.STOP_SIGNALS} == handlers
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert calls and calls[0]["stage"] == "dedup" and calls[0]["own_process"] is True
    # In-process pipelines (tests/support/pipeline.py) call run_stage without it: the test process is not frozen.
    assert inspect.signature(real).parameters["own_process"].default is False


def test_the_stage_command_gives_the_handlers_back_when_it_cannot_take_them(monkeypatch: pytest.MonkeyPatch) -> None:
    # SIGKILL's handler cannot be set: the second add fails after the first (SIGTERM's) succeeded.
    monkeypatch.setattr(stage_main, "STOP_SIGNALS", (signal.SIGTERM, signal.SIGKILL))
    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _own_sigterm_handler)
        with pytest.raises(RuntimeError, match="cannot be caught"):
            stage_main.worker_main(Settings(metrics_port=0), "dedup", None)
        assert signal.getsignal(signal.SIGTERM) is _own_sigterm_handler
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize(("threshold", "accepted"), [(0, True), (1, False), (699, False), (700, True)])
def test_a_gen0_threshold_below_pythons_own_is_refused(threshold: int, accepted: bool) -> None:
    if accepted:
        assert Settings(gc_gen0_threshold=threshold).gc_gen0_threshold == threshold
    else:
        with pytest.raises(ValidationError, match="gc_gen0_threshold"):
            Settings(gc_gen0_threshold=threshold)


@pytest.mark.parametrize(("own_process", "settled_times"), [(True, 1), (False, 0)])
async def test_run_stage_settles_the_collector_once_its_stage_is_built_when_the_process_is_its_own(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, own_process: bool, settled_times: int
) -> None:
    events: list[str] = []
    real_cores = stage_main.stage_cores

    def cores_built(*args: Any) -> Any:
        built = real_cores(*args)
        events.append("built")
        return built

    def settled(got: Settings) -> None:  # the test process is never frozen
        assert got is settings
        events.append("settled")

    monkeypatch.setattr(stage_main, "stage_cores", cores_built)
    monkeypatch.setattr(stage_main, "settle_collector", settled)
    stop = asyncio.Event()
    stop.set()  # built, then wound down at once
    await asyncio.wait_for(stage_main.run_stage(settings, "route", stop=stop, own_process=own_process), 60)
    # Frozen after what the stage holds for good (its policy, router, clients) exists, not before.
    assert events == ["built"] + ["settled"] * settled_times
