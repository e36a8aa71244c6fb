"""A farebox command that kills its own process (SIGKILL, as ``kill -9``) at a named point, for one job: so a crash
test stops a real stage process exactly where it means to, and the broker and Redis see what a crash leaves.

    python -m tests.support.crash_points POINT JOB_ID worker STAGE [...]

POINT:
* ``after_record``: the job's ledger record (and its folds) written, nothing of it published yet (also a hit
  recorded on its second trip, farebox/stages/one_trip.py);
* ``after_served``: a cache hit looked up, recorded and folded by the one-trip script, nothing published;
* ``before_fill``: the record written, the cache fill and the lease release (with its wake) not (the ledger's
  split way, as on a Redis Cluster: on one server they are one script);
* ``after_reply``: the caller's reply confirmed by the broker, the input not acked.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from farebox.cli import main
from farebox.stages import account, ledger, one_trip, runtime


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str, job_id: str) -> None:
    if point == "after_record":
        record = account.Recorder._record

        async def recorded(self: Any, rec: Any, result_json: str) -> Any:
            done = await record(self, rec, result_json)
            if rec.result.job_id == job_id:
                _die()
            return done

        account.Recorder._record = recorded  # type: ignore[method-assign]
        answer = account.AccountStage.recorded

        async def recorded_elsewhere(self: Any, ready: Any) -> Any:  # a hit recorded by farebox/stages/one_trip.py
            if ready.recording.result.job_id == job_id:
                _die()
            return await answer(self, ready)

        account.AccountStage.recorded = recorded_elsewhere  # type: ignore[method-assign]
    elif point == "after_served":
        serve = one_trip.OneTripHits.serve

        async def served(self: Any, env: Any, ready: Any, leases: Any, wake: bool) -> Any:
            state, value = await serve(self, env, ready, leases, wake)
            if state == "served" and env.job_id == job_id:
                _die()
            return state, value

        one_trip.OneTripHits.serve = served  # type: ignore[method-assign]
    elif point == "before_fill":
        fill = ledger.Ledger._fill_and_release

        def filling(self: Any, record: Any, cache: Any, lease_key: Any) -> Any:
            if str(record).endswith(f"/{job_id}"):
                _die()
            return fill(self, record, cache, lease_key)

        ledger.Ledger._fill_and_release = filling  # type: ignore[method-assign]
        # On one Redis server the fill is in the record's own script (no point between them): the split way, as
        # on a Redis Cluster, so the point exists.
        ledger.Ledger._whole_call = lambda *_: None  # type: ignore[method-assign,assignment]
    elif point == "after_reply":
        publish = runtime.Worker._publish

        async def published(self: Any, p: Any) -> None:
            await publish(self, p)
            if p.caller_reply and p.message_id == job_id:
                _die()

        runtime.Worker._publish = published  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown crash point {point!r}")


if __name__ == "__main__":
    install(sys.argv[1], sys.argv[2])
    sys.exit(main(sys.argv[3:]))
