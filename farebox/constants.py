"""Every queue name, header and Redis key prefix, in one place.

All names hang off a *namespace* (default ``farebox``) so that a test run, or a second pipeline
on the same broker, can live beside production without touching it: the intake of the default
namespace is exactly ``farebox.jobs`` as CONTRACT.md fixes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NewType

DEFAULT_NAMESPACE = "farebox"
STAGES = ("dedup", "route", "execute", "account", "batch")
NANO = 1_000_000_000  # money is kept in Redis as integer nano-dollars
JobRecord = NewType("JobRecord", str)  # "tenant/job_id": see job_record()

# AMQP headers farebox sets on its own messages.
H_REASON = "x-farebox-reason"  # why a message was dead-lettered (never prompt text)
H_STAGE = "x-farebox-stage"  # the stage that dead-lettered it
H_CODE = "x-farebox-code"  # the error code the caller receives
H_DELIVERY_COUNT = "x-delivery-count"  # set by quorum queues on redelivery
H_USER = "x-farebox-user-id"  # the sender's validated AMQP user_id, kept when a stage dead-letters its message
H_LANE = "x-farebox-lane"  # an interactive job's lane, on a queue that has no twin (wait, then recheck)
H_BATCH = "x-farebox-batch"  # how many envelopes an internal message holds (farebox/stages/batching.py)

CONTENT_TYPE = "application/json"
INTERACTIVE = ".interactive"  # the suffix of a stage queue's interactive twin (Topology.lane)


@dataclass(frozen=True)
class Topology:
    """Queue and exchange names for one namespace."""

    namespace: str = DEFAULT_NAMESPACE

    @property
    def intake(self) -> str:
        return f"{self.namespace}.jobs"

    @property
    def recheck(self) -> str:
        """Coalesced waiters come back to the dedup stage through here."""
        return f"{self.namespace}.recheck"

    @property
    def wait(self) -> str:
        """A classic queue with a message TTL: a waiter sits here, then dead-letters to recheck."""
        return f"{self.namespace}.wait"

    @property
    def wait_batch(self) -> str:
        """As ``wait``, with a longer TTL, for waiters of batch-lane jobs: their leader takes minutes to hours."""
        return f"{self.namespace}.wait.batch"

    @property
    def route(self) -> str:
        return f"{self.namespace}.route"

    def execute(self, provider: str) -> str:
        return f"{self.namespace}.execute.{provider}"

    def batch(self, provider: str) -> str:
        """Jobs of the batch lane for ``provider``'s Batch API (farebox/stages/batch_lane.py)."""
        return f"{self.namespace}.batch.{provider}"

    @property
    def account(self) -> str:
        return f"{self.namespace}.account"

    @property
    def feedback(self) -> str:
        """Quality feedback on finished jobs, from any producer (schemas/feedback.py)."""
        return f"{self.namespace}.feedback"

    def is_batched(self, queue: str) -> bool:
        """The internal hops whose messages may carry several jobs (farebox/stages/batching.py), in either lane."""
        base = self.lane_base(queue)
        return base in (self.route, self.account) or base.startswith(f"{self.namespace}.execute.")

    # Lanes (farebox/routing/priority.py). Quorum queues have no message priorities, and an existing queue
    # cannot be redeclared with other arguments, so interactive work has queues of its own: each stage queue
    # has a twin, ``<queue>.interactive``, which its stage serves first. The queues of before are the
    # background lane, so producers that only know ``<ns>.jobs`` keep working.
    def has_lanes(self, queue: str) -> bool:
        """The queues with an interactive twin: the intake and every hop between stages."""
        return queue in (self.intake, self.route, self.account) or (
            queue.startswith(f"{self.namespace}.execute.") and not queue.endswith(INTERACTIVE)
        )

    def lane(self, queue: str, lane: str) -> str:
        """``queue`` as ``lane`` has it: its interactive twin, or itself (background, or a queue without lanes)."""
        return queue + INTERACTIVE if lane == "interactive" and self.has_lanes(queue) else queue

    def lane_base(self, queue: str) -> str:
        """The background queue of a twin (any other queue as it is)."""
        base = queue.removesuffix(INTERACTIVE)
        return base if base != queue and self.has_lanes(base) else queue

    def lane_of(self, queue: str) -> str:
        return "interactive" if self.lane_base(queue) != queue else "background"

    @property
    def intake_interactive(self) -> str:
        """The interactive intake: optional for producers (the client uses it); ``priority`` in the body also works."""
        return self.lane(self.intake, "interactive")

    @property
    def dead_exchange(self) -> str:
        return f"{self.namespace}.dlx"

    @property
    def dead(self) -> str:
        """Where dead-lettered messages are kept for people to inspect."""
        return f"{self.namespace}.dead"

    @property
    def dead_notify(self) -> str:
        """A second copy of every dead letter, consumed to send the caller its error result."""
        return f"{self.namespace}.dead.notify"

    @property
    def alerts_exchange(self) -> str:
        return f"{self.namespace}.alerts"


@dataclass(frozen=True)
class RedisKeys:
    """Redis key builders for one prefix (default ``farebox:``)."""

    prefix: str = "farebox:"

    def cache(self, key: str) -> str:
        return f"{self.prefix}cache:{key}"

    def inflight(self, key: str) -> str:
        return f"{self.prefix}inflight:{key}"

    # A job's own records are keyed by tenant and job_id (``job_record``): the same job_id from two
    # tenants is two jobs, and one tenant's id can never reach another's stored result.
    def result(self, record: JobRecord) -> str:
        return f"{self.prefix}result:{record}"

    def outcome(self, record: JobRecord) -> str:
        """A provider answer kept between the call and the hand-off, so a redelivery never calls twice."""
        return f"{self.prefix}outcome:{record}"

    def ledger_entry(self, record: JobRecord) -> str:
        return f"{self.prefix}ledger:job:{record}"

    @property
    def ledger_stream(self) -> str:
        return f"{self.prefix}ledger:stream"

    def ledger_agg(self, day: str) -> str:
        """Hash of aggregates for one UTC day; fields are ``tenant|provider|model|metric``."""
        return f"{self.prefix}ledger:day:{day}"

    @property
    def ledger_days(self) -> str:
        return f"{self.prefix}ledger:days"

    def ledger_arms(self, day: str) -> str:
        """Hash of one UTC day's jobs in experiments; fields ``experiment|arm|metric`` (metrics: jobs, cost_nusd,
        baseline_nusd, errors, cache_hits, shadow_nusd: what shadow grading of the arm's jobs spent)."""
        return f"{self.prefix}ledger:arms:{day}"

    def arm(self, record: JobRecord) -> str:
        """The experiment arm a job was put in, so a policy reload never moves it (farebox/stages/arms.py)."""
        return f"{self.prefix}arm:{record}"

    def feedback(self, record: JobRecord) -> str:
        """Hash of a job's feedback: source -> JSON {score, label, ts}; one per source, the latest wins."""
        return f"{self.prefix}feedback:{record}"

    def feedback_arms(self, day: str) -> str:
        """Hash of the feedback on one UTC day's jobs (the job's day) in experiments; fields
        ``experiment|arm|source|n`` (integer), ``...|sum`` and ``...|sumsq`` of the scores (floats)."""
        return f"{self.prefix}feedback:arms:{day}"

    @property
    def feedback_jobs(self) -> str:
        """Sorted set of the records (``job_record``) with feedback, scored by the time of their latest feedback."""
        return f"{self.prefix}feedback:jobs"

    # The batch lane (farebox/stages/batch_store.py). A provider's batch records share one hash tag, so each
    # script's keys sit in one Redis Cluster slot.
    def batch_job(self, provider: str, custom_id: str) -> str:
        """Which batch took a job: a redelivered intake message must not enter a second batch."""
        return f"{self.prefix}{{batch:{provider}}}:job:{custom_id}"

    def batch_jobs(self, provider: str, batch: str) -> str:
        """Hash custom_id -> envelope JSON of one batch's jobs not handed on yet."""
        return f"{self.prefix}{{batch:{provider}}}:jobs:{batch}"

    def batch_meta(self, provider: str, batch: str) -> str:
        """Hash of one batch: state, model, counts, the provider's handle, its claim and poll times."""
        return f"{self.prefix}{{batch:{provider}}}:meta:{batch}"

    def batch_live(self, provider: str) -> str:
        """Set of a provider's batches not finished yet: what a restarted worker resumes."""
        return f"{self.prefix}{{batch:{provider}}}:live"

    def prompt(self, record: JobRecord) -> str:
        """An experiment job's messages as sent (redacted), kept for ``farebox feedback export``."""
        return f"{self.prefix}prompt:{record}"

    def shadow_spend(self, experiment: str, period: str) -> str:
        """Evaluation spend of an experiment's shadow grading in one period, in nano-dollars."""
        return f"{self.prefix}shadow:{experiment}:{period}"

    def reservation(self, record: JobRecord) -> str:
        return f"{self.prefix}reservation:{record}"

    def budget(self, tenant: str, period: str) -> str:
        return f"{self.prefix}budget:{tenant}:{period}"

    def rate_bucket(self, provider: str, dimension: str) -> str:
        return f"{self.prefix}rate:{provider}:{dimension}"

    def concurrency(self, provider: str) -> str:
        return f"{self.prefix}slots:{provider}"

    def provider_health(self, provider: str) -> str:
        return f"{self.prefix}health:{provider}"


def job_record(tenant: str, job_id: str) -> JobRecord:
    """What names one job's records in Redis: its tenant and its job_id. Tenant names cannot hold '/'."""
    return JobRecord(f"{tenant}/{job_id}")


def split_job_record(record: str) -> tuple[str, str]:
    """The tenant and job_id of a ``job_record``."""
    tenant, _, job_id = record.partition("/")
    return tenant, job_id


def as_text(value: bytes | str) -> str:
    """Redis replies and AMQP header values arrive as bytes or str, depending on the client."""
    return value.decode() if isinstance(value, bytes) else value
