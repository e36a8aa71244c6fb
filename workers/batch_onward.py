"""The batch lane's pure core: where each job of an ended (or abandoned) provider batch goes next, and the
order a batch's jobs are submitted in. The shell (farebox/stages/batch_lane.py) publishes what these say."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from farebox.constants import Topology
from farebox.errors import DeadlineExceeded
from farebox.providers.batch_types import BatchHandle, BatchLine, BatchRequest
from farebox.schemas import Envelope, ErrorInfo, Outcome
from farebox.stages.stage import Publish, envelope_publish
from farebox.tokens import count_messages

Went = Literal["answered", "sync", "error", "undecodable"]


@dataclass(frozen=True)
class Ending:
    """How a provider batch ended, for every job it held."""

    provider: str
    topo: Topology
    now: float
    on_line_error: Literal["sync", "error"] = "sync"
    handle: BatchHandle | None = None  # None: the batch never ran (refused, abandoned)
    why: str | None = None  # why the jobs without an answer have none (expired, refused, ...)
    since: float = 0.0  # when it was submitted


def onward(env: Envelope, line: BatchLine | None, end: Ending) -> tuple[Publish, Went]:
    """The job's next message, and where it goes: answered (to account, at the batch price), sync (to its
    provider's execute queue, at the sync price) or error (to account, as an error result)."""
    if line is not None and line.state == "succeeded" and line.reply is not None and end.handle is not None:
        reply = line.reply
        usage = reply.usage
        if not reply.usage_reported:
            usage = usage.model_copy(update={"input_tokens": count_messages((m.role, m.content) for m in env.job.chat)})
        assert env.route is not None
        outcome = Outcome(
            content=reply.content,
            provider=end.provider,
            model=env.route.model,  # the catalog's name, which prices it (a provider may say a snapshot)
            usage=usage,
            latency_s=round(max(0.0, end.now - end.since), 4),
            batch_id=end.handle.batch_id,
        )
        return envelope_publish(env.model_copy(update={"outcome": outcome}), end.topo.account), "answered"
    why = end.why
    if line is not None and line.ran and line.error is not None:  # the request ran and failed
        if not line.error.retryable or end.on_line_error == "error":
            return failed(env, ErrorInfo(code=line.error.code, message=line.error.message), end.topo)
        why = f"its batch line failed ({line.error.code})"
    never = why or "its batch ended without it"
    if env.deadline_at is not None and end.now >= env.deadline_at:
        err = DeadlineExceeded(f"the job passed its deadline_s in the batch lane ({never})")
        return failed(env, ErrorInfo(code=err.code, message=str(err)), end.topo)
    return to_sync(env, never, end.topo)


def undecodable(custom_id: str, raw: str, topo: Topology) -> tuple[Publish, Went]:
    """A job record that no longer reads as an envelope (written by another version, say): to the account
    queue as it is, whose stage dead-letters it with the reason, so it is kept and counted, not dropped."""
    return Publish(routing_key=topo.account, body=raw.encode(), message_id=custom_id), "undecodable"


def failed(env: Envelope, error: ErrorInfo, topo: Topology) -> tuple[Publish, Went]:
    return envelope_publish(env.model_copy(update={"error": error}), topo.account), "error"


def to_sync(env: Envelope, why: str, topo: Topology) -> tuple[Publish, Went]:
    assert env.route is not None
    route = env.route.model_copy(
        update={"price_lane": "sync", "reason": f"{env.route.reason}; moved to the synchronous lane: {why}"}
    )
    return envelope_publish(env.model_copy(update={"route": route}), topo.execute(route.provider)), "sync"


def submit_order(jobs: dict[str, str]) -> list[tuple[str, Envelope]]:
    """A batch's jobs in the order they are submitted, oldest first (a batch that expires half done has answered
    the jobs that waited longest). The same on a resume, so a found Gemini batch's lines map by position."""
    decoded = [(cid, Envelope.model_validate_json(raw)) for cid, raw in jobs.items()]
    decoded.sort(key=lambda pair: (pair[1].received_at, pair[0]))
    return decoded


def batch_request(custom_id: str, env: Envelope) -> BatchRequest:
    job = env.job
    return BatchRequest(custom_id=custom_id, messages=job.chat, max_tokens=job.max_tokens, temperature=job.temperature)
