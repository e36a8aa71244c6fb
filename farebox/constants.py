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
    def waiting(self) -> str:
        """A quorum queue with a message TTL: a waiter sits here, then dead-letters to recheck. Quorum, so that it
        is replicated over a RabbitMQ cluster's nodes (the classic ``wait`` of before lived on one node)."""
        return f"{self.namespace}.waiting"

    @property
    def waiting_batch(self) -> str:
        """As ``waiting``, with a longer TTL, for waiters of batch-lane jobs: their leader takes minutes to hours."""
        return f"{self.namespace}.waiting.batch"

    # The classic wait queues of before: no longer declared nor sent to (an existing queue cannot change its
    # type); on an upgraded broker they empty themselves into recheck, and may then be deleted.
    @property
    def wait(self) -> str:
        return f"{self.namespace}.wait"

    @property
    def wait_batch(self) -> str:
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
    """Redis key builders for one prefix (default ``farebox:``).

    Every key a script touches together shares a Redis Cluster hash tag (the ``{...}`` part), chosen by the
    record that owns it: ``{j:<tenant>/<job_id>}`` a job's own records, ``{c:<cache key>}`` a cache entry and
    its coalescing leases, ``{b:<tenant>}`` a tenant's budgets and reservations, ``{ledger}`` the aggregates
    every job folds into (the per-day hashes, the day list, the stream and their fold markers),
    ``{p:<provider>}`` a provider's rate buckets and ``{batch:<provider>}`` its batch-lane records. Keys that
    begin alike up to their tag's ``}`` always share a slot, whatever the prefix or a job_id holds, because
    the slot is taken from the first ``{`` to the first ``}`` after it. The layout is in README.md (Redis
    keys); ``tests/test_key_slots.py`` checks that every script's keys share one slot.
    """

    prefix: str = "farebox:"

    def _job(self, record: JobRecord, what: str) -> str:
        return f"{self.prefix}{{j:{record}}}:{what}"

    def cache(self, key: str) -> str:
        return f"{self.prefix}{{c:{key}}}:cache"

    def inflight(self, coalesce_key: str) -> str:
        """A coalescing lease. A cache key's leases (``<key>``, ``<key>|interactive``, ``<key>|batch``) sit with
        its cache entry, which the decide and fill scripts touch with them; a job's own lease (``job:<record>``,
        a job that does not share a cache entry) sits with its stored result."""
        if coalesce_key.startswith("job:"):
            return self._job(JobRecord(coalesce_key.removeprefix("job:")), "inflight")
        base, bar, lane = coalesce_key.partition("|")
        return f"{self.prefix}{{c:{base}}}:inflight{bar}{lane}"

    def waiters(self, coalesce_key: str) -> str:
        """Set while a coalesced job waits for a lease's leader: the script releasing the lease then wakes it."""
        return self.inflight(coalesce_key) + ":waiters"

    @property
    def wake_channel(self) -> str:
        """The Redis channel a released lease's key is published on, to wake its waiters (farebox/stages/wake.py)."""
        return f"{self.prefix}wake"

    # A job's own records are keyed by tenant and job_id (``job_record``): the same job_id from two
    # tenants is two jobs, and one tenant's id can never reach another's stored result.
    def result(self, record: JobRecord) -> str:
        return self._job(record, "result")

    def outcome(self, record: JobRecord) -> str:
        """A provider answer kept between the call and the hand-off, so a redelivery never calls twice."""
        return self._job(record, "outcome")

    def ledger_entry(self, record: JobRecord) -> str:
        return self._job(record, "ledger")

    def arm(self, record: JobRecord) -> str:
        """The experiment arm a job was put in, so a policy reload never moves it (farebox/stages/arms.py)."""
        return self._job(record, "arm")

    def feedback(self, record: JobRecord) -> str:
        """Hash of a job's feedback: source -> JSON {score, label, ts}; one per source, the latest wins."""
        return self._job(record, "feedback")

    def prompt(self, record: JobRecord) -> str:
        """An experiment job's messages as sent (redacted), kept for ``farebox feedback export``."""
        return self._job(record, "prompt")

    # The ledger's aggregates: one slot, which every recorded job folds into once (farebox/stages/ledger.py).
    # A per-day tag would spread nothing: all of a day's jobs fold into that day's hash.
    @property
    def ledger_stream(self) -> str:
        return f"{self.prefix}{{ledger}}:stream"

    def ledger_agg(self, day: str) -> str:
        """Hash of aggregates for one UTC day; fields are ``tenant|provider|model|metric``."""
        return f"{self.prefix}{{ledger}}:day:{day}"

    @property
    def ledger_days(self) -> str:
        return f"{self.prefix}{{ledger}}:days"

    def ledger_folded(self, day: str) -> str:
        """Hash of the records (``job_record``) of one day's jobs already folded into the aggregates."""
        return f"{self.prefix}{{ledger}}:folded:{day}"

    def ledger_arms(self, day: str) -> str:
        """Hash of one UTC day's jobs in experiments; fields ``experiment|arm|metric`` (metrics: jobs, cost_nusd,
        baseline_nusd, errors, cache_hits, shadow_nusd: what shadow grading of the arm's jobs spent)."""
        return f"{self.prefix}{{ledger}}:arms:{day}"

    def feedback_arms(self, day: str) -> str:
        """Hash of the feedback on one UTC day's jobs (the job's day) in experiments; fields
        ``experiment|arm|source|n`` (integer), ``...|sum`` and ``...|sumsq`` of the scores (floats)."""
        return f"{self.prefix}{{ledger}}:feedback:arms:{day}"

    def feedback_folded(self, day: str) -> str:
        """Hash ``record|source`` -> the score (and its time) folded into ``feedback_arms(day)``."""
        return f"{self.prefix}{{ledger}}:feedback:folded:{day}"

    @property
    def feedback_jobs(self) -> str:
        """Sorted set of the records (``job_record``) with feedback, scored by the time of their latest feedback."""
        return f"{self.prefix}{{ledger}}:feedback:jobs"

    # The key names of before the cluster layout, still read by ``farebox report`` so that an upgraded
    # single server keeps its history (nothing writes them any more; they expire as they always did).
    @property
    def legacy_ledger_days(self) -> str:
        return f"{self.prefix}ledger:days"

    def legacy_ledger_agg(self, day: str) -> str:
        return f"{self.prefix}ledger:day:{day}"

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

    def shadow_spend(self, experiment: str, period: str) -> str:
        """Evaluation spend of an experiment's shadow grading in one period, in nano-dollars."""
        return f"{self.prefix}shadow:{experiment}:{period}"

    # A tenant's budgets and the jobs' reservations against them: the reserve and settle scripts touch them
    # together. The reservation is the job's, but lives with its tenant's budgets for that reason.
    def reservation(self, record: JobRecord) -> str:
        tenant = split_job_record(record)[0]
        return f"{self.prefix}{{b:{tenant}}}:reservation:{record}"

    def budget(self, tenant: str, period: str, user_tier: str | None = None) -> str:
        tier = "" if user_tier is None else f"{user_tier}:"
        return f"{self.prefix}{{b:{tenant}}}:budget:{tier}{period}"

    def rate_bucket(self, provider: str, dimension: str) -> str:
        return f"{self.prefix}{{p:{provider}}}:rate:{dimension}"

    def concurrency(self, provider: str) -> str:
        return f"{self.prefix}slots:{provider}"

    def provider_health(self, provider: str) -> str:
        return f"{self.prefix}health:{provider}"

    def provider_failures(self, name: str) -> str:
        """Jobs in a row, across every execute replica, whose calls to ``name`` (a provider or provider/model)
        exhausted their retries: its circuit opens at a threshold (farebox/stages/circuits.py)."""
        return f"{self.prefix}failures:{name}"

    # The policy published with `farebox policy push` (farebox/stages/config_sync.py): one slot, {config}.
    @property
    def config_version(self) -> str:
        """The number of the newest published version."""
        return f"{self.prefix}{{config}}:version"

    def config_bundle(self, version: int | str) -> str:
        """Hash of one version's files (name -> bytes) and its ``_meta``; ``""`` gives the prefix the script
        appends the number to."""
        return f"{self.prefix}{{config}}:v:{version}"


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
