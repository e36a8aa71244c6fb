"""One settings object, read from the environment once and passed in (never a global)."""

from __future__ import annotations

import functools
from importlib.resources import files
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from farebox.constants import DEFAULT_NAMESPACE, RedisKeys, Topology
from farebox.redis_connect import parse_redis_url

# The bundled price catalog and policy (the repository's catalog/, installed as farebox.catalog).
CATALOG_DIR = Path(str(files("farebox.catalog")))

AMQP_SCHEMES = ("amqp", "amqps")
PYTHON_GEN0_THRESHOLD = 700  # gc.get_threshold()[0] of a fresh CPython


class InvalidAmqpUrl(ValueError):
    """FAREBOX_AMQP_URL is not a list of AMQP URLs of one cluster; the message says which item and why (never
    its password)."""


@functools.lru_cache(maxsize=64)  # read per message (amqp_user): parsed once per distinct value
def parse_amqp_urls(text: str) -> tuple[str, ...]:
    """The nodes of FAREBOX_AMQP_URL: one or more amqp:// or amqps:// URLs, comma-separated (a comma inside a
    password is written %2C). They are nodes of one cluster serving one pipeline, so they must name the same
    user (with the same password, or none) and the same vhost; host, port, scheme and query may differ."""
    items = [item.strip() for item in text.split(",")]
    identities: dict[tuple[str | None, str | None, str], int] = {}
    for position, item in enumerate(items, 1):
        where = f"FAREBOX_AMQP_URL item {position} of {len(items)}"
        if not item:
            raise InvalidAmqpUrl(f"{where} is empty (a stray comma?)")
        try:
            parts = urlsplit(item)
            parts.port  # noqa: B018  # raises on a port that is not a number in range
        except ValueError:
            raise InvalidAmqpUrl(f"{where} is not a URL with a readable host and port (0 to 65535)") from None
        if parts.scheme not in AMQP_SCHEMES:
            raise InvalidAmqpUrl(
                f"{where} has scheme {parts.scheme or 'none'!r}; each item must be amqp:// or amqps://"
            )
        identity = (parts.username, parts.password, _vhost_of(parts.path))
        identities.setdefault(identity, position)
    if len(identities) > 1:
        seen = "; ".join(
            f"item {pos}: user {unquote(u) if u else None!r}, vhost {v!r}" for (u, _, v), pos in identities.items()
        )
        raise InvalidAmqpUrl(
            "FAREBOX_AMQP_URL items disagree on the user, its password or the vhost (they must be the same on "
            f"every node of the cluster): {seen}"
        )
    return tuple(items)


def _vhost_of(path: str) -> str:
    """The vhost a URL path names, as aiormq reads it: none or "/" is the default vhost "/"."""
    return unquote(path[1:]) if len(path) > 1 else "/"


class ProviderLimits(BaseModel):
    """One provider's limits, shared by all its execute replicas (farebox/stages/limits.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rpm: int | None = Field(None, ge=1)  # requests per minute
    tpm: int | None = Field(None, ge=1)  # tokens per minute (prompt + max_tokens)
    concurrency: int | None = Field(None, ge=1)  # calls in flight


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FAREBOX_", frozen=True, extra="ignore")

    # One or more nodes of one RabbitMQ cluster, comma-separated (parse_amqp_urls says what they must share). Each
    # process starts at a node of its own and moves to the next when its node goes away (farebox/amqp_connect.py).
    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    # False: every process starts at the first node listed; the others are taken only while it is away.
    amqp_spread: bool = True
    # x-quorum-initial-group-size of the quorum queues farebox declares: on how many nodes each has a replica
    # (unset: RabbitMQ's default, every node in the cluster when the queue is declared). Sent only when set:
    # RabbitMQ refuses to redeclare an existing queue with an argument it was declared without (PRECONDITION_FAILED,
    # checked on 3.10.8), so set it before a namespace's first start; `rabbitmq-queues grow|shrink` changes the
    # replicas of queues that exist.
    quorum_initial_group_size: int | None = Field(None, ge=1, le=255)
    redis_url: str = "redis://localhost:6379/0"
    catalog: Path = CATALOG_DIR / "model_costs.json"
    policy: Path = CATALOG_DIR / "policy.json"
    # "redis": the stages take the policy and catalog last published with `farebox policy push` (and follow
    # every new version) instead of the files above (farebox/stages/config_sync.py).
    config_source: Literal["files", "redis"] = "files"
    cache_ttl_s: int = Field(3600, ge=0)
    metrics_port: int = Field(9464, ge=0, le=65535)
    # Loopback unless asked: the container image sets 0.0.0.0 so Prometheus can scrape it.
    metrics_host: str = "127.0.0.1"

    # Not in the contract's table, but needed to run two pipelines (or a test run) on one broker.
    namespace: str = Field(DEFAULT_NAMESPACE, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    redis_prefix: str = "farebox:"

    # Delivery knobs.
    prefetch: int = Field(64, ge=1, le=10_000)
    # Jobs a stage process may handle at once for the interactive lane beyond its prefetch, which background
    # work may fill: an interactive job never waits for a backfill's job to finish (farebox/stages/slots.py).
    interactive_reserve: int = Field(16, ge=0, le=10_000)
    # When both lanes wait, after this many interactive grants the next slot goes to background work, so that
    # work marked interactive, however much of it, slows a backfill down and never stops it (0: strict priority).
    background_every: int = Field(10, ge=0, le=10_000)
    # Jobs per message between stages (1: one each) and how long a part-full batch may wait.
    batch_max: int = Field(32, ge=1, le=1000)
    batch_linger_ms: float = Field(10.0, ge=0, le=1000)
    delivery_limit: int = Field(5, ge=1, le=1000)
    intake_max_length: int = Field(100_000, ge=1)
    stage_max_length: int = Field(100_000, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    result_ttl_s: int = Field(86_400, ge=60)
    # Retention: a job's ledger entry (and its feedback) expires after ledger_entry_ttl_s, a day's aggregates
    # (what `farebox report` reads) ledger_days_kept days after that day. The ledger stream is the export path.
    ledger_entry_ttl_s: int = Field(30 * 86_400, ge=86_400)
    ledger_days_kept: int = Field(400, ge=1)
    # What <ns>.dead keeps: a record per refused message (never its body unless asked), the newest so many,
    # so a flood of bad messages cannot fill the broker's disk (farebox/stages/topology.py, deadletter.py).
    dead_max_length: int = Field(10_000, ge=1)
    dead_max_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    dead_ttl_s: float = Field(7 * 86_400, ge=0.001)
    # Keep each refused message's raw body in its record too: it may hold prompts and secrets (debugging only).
    dead_keep_bodies: bool = False
    # The stages' Redis writes count once this many replicas confirm them (WAIT after each pipeline of
    # commands, up to redis_wait_timeout_ms; then Redis counts as away and they are written again): with a
    # Sentinel, writes the old master alone took when it was replaced would otherwise be lost. 0: no WAIT.
    redis_wait_replicas: int = Field(0, ge=0, le=16)
    redis_wait_timeout_ms: int = Field(500, ge=1, le=60_000)
    # Coalesced waiters re-check this often; the leader's lease bounds how long they trust it.
    coalesce_poll_ms: int = Field(100, ge=10)
    leader_lease_s: int = Field(300, ge=1)
    # A coalesced waiter is held by its dedup process, unacked, until the release of its leader's lease wakes it
    # (farebox/stages/wake.py), re-checking every coalesce_recheck_ms meanwhile, for at most coalesce_hold_s; then,
    # and beyond coalesce_hold_max held at once (0: never held), it parks in the broker. Dedup's prefetch is the
    # prefetch plus coalesce_hold_max, so held waiters never keep jobs from being handled.
    coalesce_hold_max: int = Field(256, ge=0, le=10_000)
    coalesce_hold_s: float = Field(20.0, gt=0, le=600)  # well below RabbitMQ's consumer_timeout (30 min)
    coalesce_recheck_ms: int = Field(1000, ge=10)
    # On one Redis server (alone or a Sentinel's master), a cache hit is looked up, recorded and folded in one round
    # trip when the dedup process remembers the answer it read there last (farebox/stages/one_trip.py): the answers
    # of the last hit_memo_entries cache keys are kept in memory (0: none; each hit then takes two round trips), at
    # most hit_memo_bytes of entry JSON in all: the least recently used go first, and a larger answer is not kept.
    hit_memo_entries: int = Field(1024, ge=0, le=1_000_000)
    hit_memo_bytes: int = Field(16 * 1024 * 1024, ge=0)
    # A stage process's garbage collector (farebox/stages/main.py): once its stage is built, what it holds
    # (modules, schemas, the policy and catalog) is frozen out of collections (gc_freeze; what is loaded later,
    # such as the tokenizer's tables on the first job, is not), and the youngest generation is collected every
    # gc_gen0_threshold allocations, not Python's 700 (0: Python's; below 700 is refused, it would collect more
    # often). Collections took 13% of the stages' CPU before (bench/gc_probe.py).
    gc_freeze: bool = True
    gc_gen0_threshold: int = Field(10_000, ge=0, le=1_000_000)

    # The batch lane (farebox/stages/batch_lane.py): a batch whose worker has not renewed its claim this long is
    # taken over by another (a worker killed with its batches); provider batches are polled from
    # batch_poll_first_s after the submit, the wait growing 1.5x a poll up to batch_poll_max_s.
    batch_claim_s: float = Field(30.0, ge=0.5, le=3600)
    batch_poll_first_s: float = Field(1.0, ge=0.05, le=3600)
    batch_poll_max_s: float = Field(60.0, ge=0.05, le=86_400)
    # Coalesced waiters of a batch-lane job re-check this often (their leader waits for a provider batch).
    batch_wait_poll_ms: int = Field(5000, ge=10)

    # Provider calls.
    provider_timeout_s: float = Field(60.0, gt=0)
    provider_max_attempts: int = Field(4, ge=1, le=20)  # per candidate
    provider_retry_budget: int = Field(8, ge=0, le=100)  # retries per job, across all candidates
    provider_concurrency: int = Field(256, ge=1)  # calls in flight per execute process
    # JSON, e.g. '{"openai": {"rpm": 500, "tpm": 200000, "concurrency": 64}}'
    provider_limits: dict[str, ProviderLimits] = Field(default_factory=dict)
    emulator_port: int = Field(8099, ge=1, le=65535)
    # Where providers without an API key are sent; default: the local emulator on emulator_port.
    emulator_url: str | None = None

    alert_webhook_url: str | None = None  # budget alerts are also POSTed here as JSON

    log_json: bool = False
    log_level: str = "INFO"

    @field_validator("gc_gen0_threshold")
    @classmethod
    def _gen0_threshold_python_or_above(cls, threshold: int) -> int:
        if 0 < threshold < PYTHON_GEN0_THRESHOLD:
            raise ValueError(f"0 (Python's own) or at least {PYTHON_GEN0_THRESHOLD}: fewer collect more often")
        return threshold

    @field_validator("amqp_url")
    @classmethod
    def _amqp_nodes_of_one_cluster(cls, url: str) -> str:
        parse_amqp_urls(url)  # an InvalidAmqpUrl (a ValueError: pydantic reports it as this setting's) or a list
        return url

    @field_validator("redis_url")
    @classmethod
    def _a_redis_url_farebox_reads(cls, url: str) -> str:
        parse_redis_url(url)  # a server, a Sentinel or a Cluster URL (farebox/redis_connect.py), or an error now
        return url

    @model_validator(mode="after")
    def _replicas_waited_for_where_they_can_be(self) -> Settings:
        if self.redis_wait_replicas and parse_redis_url(self.redis_url).kind == "cluster":
            raise ValueError("redis_wait_replicas: not available on a Redis Cluster yet (only a server or a Sentinel)")
        return self

    @property
    def topology(self) -> Topology:
        return Topology(self.namespace)

    @property
    def ledger_entry_keep_s(self) -> int:
        """How long a job's ledger entry lives: never less than its stored result, which a replay reads."""
        return max(self.ledger_entry_ttl_s, self.result_ttl_s)

    @property
    def amqp_urls(self) -> tuple[str, ...]:
        """The nodes of FAREBOX_AMQP_URL in the order listed (checked when the settings were read)."""
        return parse_amqp_urls(self.amqp_url)

    @property
    def amqp_vhost(self) -> str:
        """The vhost every node of FAREBOX_AMQP_URL names."""
        return _vhost_of(urlsplit(self.amqp_urls[0]).path)

    @property
    def amqp_user(self) -> str:
        """The pipeline's own RabbitMQ user: what RabbitMQ vouches for on messages the pipeline sends itself."""
        return self.amqp_user_id or "guest"

    @property
    def amqp_user_id(self) -> str | None:
        """The user_id the pipeline stamps on what it sends: only a user named in FAREBOX_AMQP_URL (every node
        names the same), which PLAIN logs in as (with EXTERNAL or token auth RabbitMQ's user may differ, and a
        wrong user_id is refused)."""
        username = urlsplit(self.amqp_urls[0]).username
        return unquote(username) if username else None

    @property
    def keys(self) -> RedisKeys:
        return RedisKeys(self.redis_prefix)
