"""The providers' batch APIs, shared core: when a batch's requests finish, and what each one answers.

A batch runs on the clock, not on polls: its state at any moment is a pure function of its creation
time, the delay knob, the fate drawn for it at creation and when (if ever) a cancel came. No
background task runs, and a client that polls once, after the delay, sees it ended. The delay splits
like the real lifecycle: the first tenth validates, the requests then finish one after another until
nine tenths, the rest is finalizing; a cancel takes a tenth of the delay to land.

Every request is answered as the synchronous endpoint would answer it (same text, same usage), so a
batch and a sync call of one prompt agree. batch_openai.py, batch_anthropic.py and batch_gemini.py
turn the results into each provider's wire format.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from farebox.emulator.knobs import EmulatorKnobs
from farebox.emulator.replies import Reply, not_allowed
from farebox.emulator.text import Answer
from farebox.emulator.wire import BadRequest, Prompt, Wire
from farebox.tokens import count_messages

VALIDATE_SHARE = 0.1
RUN_SHARE = 0.9
CANCEL_SHARE = 0.1
WINDOW_S = 24 * 3600  # the completion window every provider promises; shown, never waited for

Fate = Literal["run", "fail", "expire"]
# The lifecycle in OpenAI's words; the other modules map it onto theirs.
Status = Literal["validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled"]
Kind = Literal["succeeded", "errored", "expired", "canceled"]
AnswerFn = Callable[[str, Prompt], Answer]
FINAL: dict[Fate, Status] = {"run": "completed", "fail": "failed", "expire": "expired"}


@dataclass(frozen=True)
class Line:
    """One request of a batch, checked as the sync endpoint checks it."""

    custom_id: str
    prompt: Prompt | None
    refusal: BadRequest | None = None  # what the sync endpoint would answer with a 400
    faulty: bool = False  # drawn to get a server error (batch_error_line_rate)


@dataclass(frozen=True)
class LineResult:
    custom_id: str
    kind: Kind
    status: int = 200  # the HTTP status the sync endpoint would have answered with
    body: dict[str, Any] | None = None  # the sync endpoint's reply (answer or error), when it ran
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass
class Batch:
    id: str
    provider: str
    wire: Wire
    lines: tuple[Line, ...]
    created: float
    delay: float
    fate: Fate
    info: dict[str, Any] = field(default_factory=dict)  # the API's own fields (endpoint, metadata, files...)
    cancel_at: float | None = None
    results: tuple[LineResult, ...] | None = None
    counted: bool = True  # False once /_emulator/reset has passed it

    @property
    def started(self) -> float:
        return self.created + VALIDATE_SHARE * self.delay

    @property
    def end(self) -> float:
        natural = self.started if self.fate == "fail" else self.created + self.delay
        if self.cancel_at is None:
            return natural
        return min(natural, self.cancel_at + CANCEL_SHARE * self.delay)

    @property
    def finalizing(self) -> float:
        return self.created + RUN_SHARE * self.delay

    def line_done_at(self, i: int) -> float:
        span = (RUN_SHARE - VALIDATE_SHARE) * self.delay
        return self.started + span * (i + 1) / len(self.lines)

    def runs(self, i: int) -> bool:
        """Whether request i is executed at all: not in a failed batch, not past an expiring batch's
        first half, not after a cancel."""
        if self.fate == "fail" or (self.fate == "expire" and i >= len(self.lines) // 2):
            return False
        return self.cancel_at is None or self.line_done_at(i) <= self.cancel_at

    def ended(self, now: float) -> bool:
        return now >= self.end

    def status(self, now: float) -> Status:
        if self.ended(now):
            return "cancelled" if self.cancel_at is not None else FINAL[self.fate]
        if self.cancel_at is not None:
            return "cancelling"
        if now < self.started:
            return "validating"
        if self.fate == "run" and now >= self.finalizing:
            return "finalizing"
        return "in_progress"

    def cancel(self, now: float) -> None:
        if not self.ended(now) and self.cancel_at is None:
            self.cancel_at = now

    def progress(self, now: float) -> tuple[int, int]:
        """(answered, errored): the requests finished by ``now``, as the live counts show them."""
        ok = bad = 0
        for i, line in enumerate(self.lines):
            if self.runs(i) and self.line_done_at(i) <= now:
                if line.refusal is not None or line.faulty:
                    bad += 1
                else:
                    ok += 1
        return ok, bad


@dataclass(frozen=True)
class StoredFile:
    id: str
    provider: str
    filename: str
    purpose: str
    data: bytes
    created: int


@dataclass(frozen=True)
class BatchCall:
    """One request to a batch route, with what the batch APIs need beyond the chat routes' body."""

    method: str
    tail: str  # the path after the provider prefix: "/v1/batches/batch_x"
    prefix: str  # "" or "/openai": the emulator's own URLs (Anthropic's results_url) keep it
    provider: str
    body: bytes
    query: dict[str, str]
    content_type: str
    origin: str  # "http://127.0.0.1:8099", as the client addressed the emulator

    def url(self, tail: str) -> str:
        return f"{self.origin}{self.prefix}{tail}"


class BatchStore:
    """Every batch and file, in memory (the emulator is a test double), and the batch counts."""

    def __init__(self, knobs: EmulatorKnobs, answer: AnswerFn, clock: Callable[[], float] = time.time) -> None:
        self.knobs = knobs
        self.answer = answer
        self.clock = clock
        # A stream of its own, so batches change neither which chat requests fail nor their latency.
        self.rng = random.Random(None if knobs.seed is None else knobs.seed + 2)
        self.batches: dict[str, Batch] = {}
        self.files: dict[str, StoredFile] = {}
        self.created: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()

    def create(
        self, batch_id: str, provider: str, wire: Wire, lines: Sequence[Line], info: dict[str, Any], *, invalid: bool
    ) -> Batch:
        """A new batch; ``invalid`` (its input failed validation) makes it fail without a fault drawn."""
        fate, faulty = self._draw(provider, len(lines))
        if invalid:
            fate = "fail"
        elif fate != "run":
            self.faults[fate] += 1
        marked = tuple(replace(line, faulty=bad) for line, bad in zip(lines, faulty, strict=True))
        batch = Batch(batch_id, provider, wire, marked, self.clock(), self.knobs.batch_delay_s, fate, info)
        self.batches[batch_id] = batch
        self.created[provider] += 1
        return batch

    def forget(self, batch: Batch) -> None:
        """Drop a batch the API refused at creation after all (Anthropic's answer to the fail fault)."""
        del self.batches[batch.id]
        self.created[batch.provider] -= 1
        if not self.created[batch.provider]:
            del self.created[batch.provider]

    def _draw(self, provider: str, n: int) -> tuple[Fate, list[bool]]:
        # Every batch takes one draw and one per line whatever the knobs say, so with a seed the
        # same batches get the same fates when only some rates change.
        knobs = self.knobs
        draw = self.rng.random()
        lines = [self.rng.random() < knobs.batch_error_line_rate for _ in range(n)]
        if not knobs.faults_apply_to(provider):
            return "run", [False] * n
        if draw < knobs.batch_fail_rate:
            return "fail", lines
        if draw < knobs.batch_fail_rate + knobs.batch_expire_rate:
            return "expire", lines
        return "run", lines

    def find(self, batch_id: str, provider: str) -> Batch | None:
        # Each provider name is a provider of its own: a batch made under /openai is not under /vllm.
        batch = self.batches.get(batch_id)
        return batch if batch is not None and batch.provider == provider else None

    def newest_first(self, provider: str) -> list[Batch]:
        return [b for b in reversed(self.batches.values()) if b.provider == provider]

    def results(self, batch: Batch, now: float) -> tuple[LineResult, ...] | None:
        """Every request's result once the batch has ended (computed once, then kept), else None."""
        if not batch.ended(now):
            return None
        if batch.results is None:
            failed = batch.status(now) == "failed"
            batch.results = () if failed else tuple(self._result(batch, i, line) for i, line in enumerate(batch.lines))
        return batch.results

    def _result(self, batch: Batch, i: int, line: Line) -> LineResult:
        result = self._run(batch, i, line)
        if batch.counted:
            self.kinds[result.kind] += 1
            if result.kind == "succeeded" and line.prompt is not None:
                self.requests[f"{batch.provider}/{line.prompt.model}"] += 1
            elif line.faulty and result.status == 500:
                self.faults["line_error"] += 1
        return result

    def _run(self, batch: Batch, i: int, line: Line) -> LineResult:
        if not batch.runs(i):
            return LineResult(line.custom_id, "canceled" if batch.cancel_at is not None else "expired")
        wire = batch.wire
        if line.refusal is not None:
            body = wire.error("invalid", line.refusal.message, line.refusal.param)
            return LineResult(line.custom_id, "errored", 400, body)
        if line.faulty or line.prompt is None:
            return LineResult(line.custom_id, "errored", 500, wire.error("server", "emulated batch request failure"))
        prompt = line.prompt
        answer = self.answer(batch.provider, prompt)
        tokens = count_messages(prompt.pairs)
        return LineResult(line.custom_id, "succeeded", 200, wire.render(prompt, answer, tokens), tokens, answer.tokens)

    def stats(self) -> dict[str, Any] | None:
        """The batch counts for /_emulator/stats, or None when no batch was made since the last reset."""
        now = self.clock()
        counted = [b for b in self.batches.values() if b.counted]
        if not counted and not self.faults:
            return None
        for batch in counted:  # settle the ended ones, so their requests count without a client read
            self.results(batch, now)
        return {
            "created": dict(self.created),
            "status": dict(Counter(f"{b.provider}/{b.status(now)}" for b in counted)),
            "requests": dict(self.requests),
            "results": dict(self.kinds),
            "faults": dict(self.faults),
        }

    def reset(self) -> None:
        for batch in self.batches.values():
            batch.counted = False
        for counter in (self.created, self.requests, self.kinds, self.faults):
            counter.clear()


# --- helpers the API modules share -----------------------------------------------------------
_ids = random.Random()  # ids need only be unique, like wire.py's
ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
BASE62 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def random_id(prefix: str, chars: int = 24, alphabet: str = BASE62) -> str:
    return prefix + "".join(_ids.choices(alphabet, k=chars))


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise BadRequest("the request body is not valid JSON") from None


def by_method(method: str, handlers: dict[str, Callable[[], Reply]]) -> Reply:
    """The handler for the method; a GET route answers HEAD too, as the chat routes' GETs do."""
    handler = handlers.get("GET" if method == "HEAD" else method)
    if handler is None:
        allowed = [m for name in handlers for m in ((name, "HEAD") if name == "GET" else (name,))]
        return not_allowed(", ".join(allowed))
    return handler()


def page(items: list[Any], ids: list[str], limit: str | None, after: str | None) -> tuple[list[Any], bool]:
    """One page of a newest-first list, cursor style: the items after ``after``, at most ``limit``."""
    start = ids.index(after) + 1 if after is not None and after in ids else 0
    try:
        size = max(1, min(int(limit), 1000)) if limit else 20
    except ValueError:
        raise BadRequest("'limit' must be an integer", "limit") from None
    chosen = items[start : start + size]
    return chosen, start + size < len(items)
