"""Counting a message's jobs while a stage handles them (farebox/stages/runtime.py), so that a part-full batch of
outgoing messages goes out once nothing else of its lane can join it."""

from __future__ import annotations

from collections.abc import Callable


class Unhandled:
    """The jobs of one message counted in the worker's ``busy`` (by lane) and not handled yet. Each is released
    once, whichever way the message goes (a job cancelled before it ran included), so the count cannot stick
    above zero and stop idle flushes; ``done(lane)`` runs at each release."""

    def __init__(self, busy: dict[str, int], done: Callable[[str], None], lane: str) -> None:
        self._busy = busy
        self._done = done
        self._lane = lane  # the lane of the queue it came from
        self.jobs = 0
        self.add(1)

    def add(self, n: int) -> None:
        self.jobs += n
        self._busy[self._lane] += n

    def release(self) -> None:
        if self.jobs > 0:
            self.jobs -= 1
            self._done(self._lane)

    def release_all(self) -> None:
        while self.jobs > 0:
            self.release()
