"""One settings object, read from the environment once and passed in (never a global)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from farebox.constants import DEFAULT_NAMESPACE, RedisKeys, Topology

# The bundled price catalog and policy (the repository's catalog/, installed as farebox.catalog).
CATALOG_DIR = Path(str(files("farebox.catalog")))


class ProviderLimits(BaseModel):
    """One provider's limits, shared by all its execute replicas (farebox/stages/limits.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rpm: int | None = Field(None, ge=1)  # requests per minute
    tpm: int | None = Field(None, ge=1)  # tokens per minute (prompt + max_tokens)
    concurrency: int | None = Field(None, ge=1)  # calls in flight


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FAREBOX_", frozen=True, extra="ignore")

    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    redis_url: str = "redis://localhost:6379/0"
    catalog: Path = CATALOG_DIR / "model_costs.json"
    policy: Path = CATALOG_DIR / "policy.json"
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
    # Coalesced waiters re-check this often; the leader's lease bounds how long they trust it.
    coalesce_poll_ms: int = Field(100, ge=10)
    leader_lease_s: int = Field(300, ge=1)

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

    @property
    def topology(self) -> Topology:
        return Topology(self.namespace)

    @property
    def ledger_entry_keep_s(self) -> int:
        """How long a job's ledger entry lives: never less than its stored result, which a replay reads."""
        return max(self.ledger_entry_ttl_s, self.result_ttl_s)

    @property
    def amqp_user(self) -> str:
        """The pipeline's own RabbitMQ user: what RabbitMQ vouches for on messages the pipeline sends itself."""
        return unquote(urlsplit(self.amqp_url).username or "guest")

    @property
    def amqp_user_id(self) -> str | None:
        """The user_id the pipeline stamps on what it sends: only a user named in FAREBOX_AMQP_URL, which PLAIN
        logs in as (with EXTERNAL or token auth RabbitMQ's user may differ, and a wrong user_id is refused)."""
        username = urlsplit(self.amqp_url).username
        return unquote(username) if username else None

    @property
    def keys(self) -> RedisKeys:
        return RedisKeys(self.redis_prefix)
