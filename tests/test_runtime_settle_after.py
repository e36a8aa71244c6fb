"""The stage runtime's ``Handled.settle_after``: work begun beside a job's publishes (the execute stage's kept answer)
has finished before the message is settled, acked or requeued; and a job of a batch tried again in the shell is
handed to the core as a redelivery; a library's panic (a BaseException) is one job's failure
(farebox/stages/runtime.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from farebox.constants import H_BATCH
from farebox.errors import FareboxError
from farebox.settings import Settings
from farebox.stages import runtime
from farebox.stages.stage import Delivery, Handled, Publish


class Core:
    """Hands each job on with a slow write beside it, and remembers the deliveries it was given."""

    name = "testsettle"

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.writes: list[asyncio.Task[None]] = []
        self.written = 0

    def input_queues(self) -> list[str]:
        return []

    def decode(self, delivery: Delivery) -> Any:
        return delivery

    async def write(self) -> None:
        await asyncio.sleep(0.05)
        self.written += 1

    async def handle(self, item: Any, delivery: Delivery) -> Handled:
        self.deliveries.append(delivery)
        self.writes.append(asyncio.ensure_future(self.write()))
        return Handled([Publish(routing_key="next", body=b"{}")], settle_after=self.writes[-1])

    def fail(self, item: Any, err: FareboxError) -> Handled:
        return Handled([])


def worker(core: Core, publish: Any, settings: Settings | None = None) -> runtime.Worker:
    w = runtime.Worker(settings or Settings(batch_max=1), core, [])
    w._publish = publish  # type: ignore[method-assign]
    return w


async def published(p: Publish) -> None:
    """A publish the broker confirmed."""


async def failing(p: Publish) -> None:
    await asyncio.sleep(0)
    raise RuntimeError("the publish failed")


async def test_a_failed_publish_is_raised_only_after_the_write_beside_it_finished() -> None:
    core = Core()
    with pytest.raises(RuntimeError):
        await worker(core, failing)._attempt(Delivery("q", b"{}"), lambda: None)
    # The caller (on_message) requeues now: a redelivery must find what the write left.
    assert core.written == 1


async def test_a_confirmed_job_is_settled_after_the_write_beside_it_and_before_after_publish() -> None:
    core = Core()
    seen: list[int] = []

    async def handle(item: Any, delivery: Delivery) -> Handled:
        handled = await Core.handle(core, item, delivery)

        async def after() -> None:
            seen.append(core.written)

        return Handled(handled.publishes, settle_after=handled.settle_after, after_publish=after)

    core.handle = handle  # type: ignore[method-assign]
    assert await worker(core, published)._attempt(Delivery("q", b"{}"), lambda: None) is True
    assert core.written == 1 and seen == [1]


async def test_a_cancelled_attempt_leaves_the_write_beside_it_running_to_its_end() -> None:
    core = Core()

    attempt = asyncio.create_task(worker(core, published)._attempt(Delivery("q", b"{}"), lambda: None))
    await asyncio.sleep(0.01)  # published; the attempt waits for the write (0.05 s), and a stop cancels it
    assert not attempt.done()
    attempt.cancel()
    await asyncio.gather(attempt, return_exceptions=True)
    (write,) = core.writes
    await asyncio.wait_for(write, 2)  # a cancelled write would raise CancelledError here
    assert core.written == 1


async def test_a_job_of_a_batch_tried_again_in_the_shell_is_a_redelivery() -> None:
    core = Core()
    failures = [RuntimeError("the publish failed")]

    async def flaky(p: Publish) -> None:
        if failures:
            raise failures.pop()

    w = worker(core, flaky)
    assert w.settings.delivery_limit > 3
    await asyncio.wait_for(w._job_of_batch(Delivery("q", b"{}", delivery_count=2), lambda: None), 5)
    first, again = core.deliveries
    assert (first.redelivered, first.delivery_count) == (False, 2)
    # As the broker would mark it: the core may find the work of the first attempt (execute's kept answer).
    assert (again.redelivered, again.delivery_count) == (True, 3)


class PanicException(BaseException):
    """Named as pyo3's is (tiktoken's, say): a BaseException."""


@pytest.mark.parametrize(
    ("raised", "retried"),
    [(PanicException("tiktoken panicked"), True), (ValueError("a bug"), True), (KeyboardInterrupt(), False)],
    ids=["library-panic", "exception", "keyboard-interrupt"],
)
async def test_a_library_panic_is_one_jobs_failure_and_a_cancel_is_not(raised: BaseException, retried: bool) -> None:
    core = Core()

    async def handle(item: Any, delivery: Delivery) -> Handled:
        raise raised

    core.handle = handle  # type: ignore[method-assign]
    attempt = worker(core, published)._attempt(Delivery("q", b"{}"), lambda: None)
    if retried:
        assert await attempt == 0.5  # retried after a delay, up to the delivery limit, then dead-lettered
    else:
        with pytest.raises(type(raised)):
            await attempt


def incoming(body: bytes, headers: dict[str, Any] | None = None) -> Any:
    """What the runtime reads of an aio-pika message."""
    return SimpleNamespace(
        body=body,
        headers=headers or {},
        redelivered=False,
        timestamp=None,
        reply_to=None,
        correlation_id=None,
        message_id="m-1",
        user_id=None,
    )


class PanickingDecode(Core):
    def decode(self, delivery: Delivery) -> Any:
        if delivery.body == b"bad":
            raise PanicException("pydantic-core panicked")
        return delivery


@pytest.fixture
def settled(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, bool]]:
    seen: list[dict[str, bool]] = []

    async def settle(message: Any, *, ack: bool = False, requeue: bool = False) -> None:
        seen.append({"ack": ack, "requeue": requeue})

    monkeypatch.setattr(runtime, "settle", settle)
    return seen


async def test_a_message_whose_decode_panics_is_requeued_not_left_unsettled(settled: list[dict[str, bool]]) -> None:
    on_message = worker(PanickingDecode(), published)._callback("q")
    await asyncio.wait_for(on_message(incoming(b"bad")), 5)
    assert settled == [{"ack": False, "requeue": True}]  # the broker's delivery limit then dead-letters it


async def test_a_job_of_a_batch_whose_decode_panics_is_dead_lettered_alone(
    settled: list[dict[str, bool]], monkeypatch: pytest.MonkeyPatch
) -> None:
    core = PanickingDecode()
    w = worker(core, published, Settings(batch_max=1, delivery_limit=2))
    dead: list[bytes] = []

    async def dead_letter(delivery: Delivery, err: Exception) -> None:
        dead.append(delivery.body)

    monkeypatch.setattr(w, "_dead_letter", dead_letter)
    batch = incoming(b"good\nbad", {H_BATCH: 2})
    await asyncio.wait_for(w._callback("q")(batch), 10)
    assert [d.body for d in core.deliveries] == [b"good"] and dead == [b"bad"]
    assert settled == [{"ack": True, "requeue": False}]  # the good job is not published again
