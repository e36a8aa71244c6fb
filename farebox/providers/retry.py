"""Retries around one provider call: backoff with jitter, Retry-After honoured, deadline kept."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.stop import stop_base
from tenacity.wait import wait_random_exponential

from farebox.errors import DeadlineExceeded, RetryableError
from farebox.providers.base import ProviderAdapter, ProviderReply, ProviderRequest

BACKOFF = wait_random_exponential(multiplier=0.2, max=8)
# Below this a call cannot do useful work; better to report the deadline than to start it.
MIN_CALL_S = 0.05


class _DeadlineStop(stop_base):
    """Stops retrying when the next sleep would end past the deadline; remembers that it did."""

    def __init__(self, deadline_at: float | None, clock: Callable[[], float]) -> None:
        self.deadline_at = deadline_at
        self.clock = clock
        self.fired = False

    def __call__(self, state: RetryCallState) -> bool:
        if self.deadline_at is None:
            return False
        if self.clock() + (state.upcoming_sleep or 0.0) + MIN_CALL_S >= self.deadline_at:
            self.fired = True
        return self.fired


def _wait(state: RetryCallState) -> float:
    backoff = BACKOFF(state)
    exc = state.outcome.exception() if state.outcome is not None else None
    hint = exc.retry_after_s if isinstance(exc, RetryableError) else None
    # The provider's own Retry-After wins when it asks for longer than our backoff.
    return max(backoff, hint) if hint is not None else backoff


async def call_with_retries(
    adapter: ProviderAdapter,
    request: ProviderRequest,
    *,
    max_attempts: int,
    deadline_at: float | None,
    clock: Callable[[], float] = time.time,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> tuple[ProviderReply, int]:
    """Call the adapter until it answers; return the reply and how many retries it took.

    Only ``RetryableError`` is retried; after ``max_attempts`` the last one is raised as is.
    With a deadline, no call outlives it and no sleep crosses it: ``DeadlineExceeded`` instead.
    """

    async def call_once(attempt: int) -> ProviderReply:
        call = request
        if deadline_at is not None:
            left = deadline_at - clock()
            if left < MIN_CALL_S:
                raise DeadlineExceeded(_deadline_message(attempt - 1))
            call = dataclasses.replace(request, timeout_s=min(request.timeout_s, left))
        return await adapter.complete(call)

    # Nearly every call answers at once, and tenacity's per-call machinery cost 8% of the execute
    # stage's CPU in a profile: the first call is made here, and tenacity takes over only after
    # it failed, replaying that failure as its own first attempt, so waits, stops and the retry
    # callback see exactly what they would have seen.
    try:
        return await call_once(1), 0
    except RetryableError as exc:
        first_failure = exc

    deadline_stop = _DeadlineStop(deadline_at, clock)

    def before_sleep(state: RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None:
            exc = state.outcome.exception()
            if exc is not None:
                on_retry(exc, state.upcoming_sleep)

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(RetryableError),
        stop=stop_after_attempt(max_attempts) | deadline_stop,
        wait=_wait,
        before_sleep=before_sleep,
        reraise=True,
    )
    attempts = 0
    try:
        async for attempt in retrying:
            with attempt:
                attempts += 1
                if attempts == 1:
                    raise first_failure
                reply = await call_once(attempts)
    except RetryableError as exc:
        if deadline_stop.fired:
            raise DeadlineExceeded(_deadline_message(attempts) + f"; last error: {exc}") from exc
        raise
    return reply, attempts - 1


def _deadline_message(calls: int) -> str:
    return f"deadline passed after {calls} provider call{'s' if calls != 1 else ''}"
