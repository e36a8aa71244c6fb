"""The error tree every stage speaks.

Three families, and only the worker shell (farebox/stages/runtime.py) decides what each one means for a
message:

* ``RetryableError``: the world is temporarily in the way (a provider 5xx, a 429, Redis or the
  broker away). The shell holds or requeues the message and tries again.
* ``PermanentError``: this job can never succeed as written (bad input, unknown model, a provider
  4xx). The shell turns it into an error result for the caller; it is never retried.
* ``BlockedError``: the job is fine but policy refuses it (personal data, budget). Also ends in an
  error result, with its own code so callers can tell refusal from failure.

Anything else a stage raises (a bug, a library's error, a Rust extension's panic: ``library_panic``) is
retried like a ``RetryableError`` up to the delivery limit, then dead-lettered with an ``internal`` result.

``code`` is the stable ``error.code`` of the result (see CONTRACT.md). ``str(err)`` is the
message shown to the caller: it must be actionable and must never contain prompt text or secrets.
"""

from __future__ import annotations

from typing import ClassVar

import aiormq
from pydantic import ValidationError
from redis import exceptions as redis_errors

# What the broker being away (or a robust connection being restored) looks like from aio-pika and
# aiormq. Not RuntimeError: aio-pika raises it for misuse too, and a bug must fail, not be retried
# for ever as if the broker were down. Timeouts are added where a wait can time out.
BROKER_DOWN: tuple[type[Exception], ...] = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
)
BROKER_DOWN_OR_TIMEOUT: tuple[type[Exception], ...] = (*BROKER_DOWN, TimeoutError)


def broker_away(err: BaseException, connection: object) -> bool:
    """Whether ``err`` means the broker is away. aiormq and aio-pika also raise a bare RuntimeError
    ("... closed") when a call meets a connection that closed under it: that counts only while the
    connection really is closed or reconnecting; any other RuntimeError is a bug and must surface."""
    if isinstance(err, BROKER_DOWN):
        return True
    if type(err) is RuntimeError:
        return bool(
            getattr(connection, "is_closed", False)
            or getattr(connection, "reconnecting", False)
            or _transport_closed(connection)
        )
    return False


def _transport_closed(connection: object) -> bool:
    """Whether the AMQP connection under a robust one is closed or gone. When the broker closes it
    (INTERNAL_ERROR, a restart), the robust connection is for a moment neither closed nor reconnecting, and
    ``channel()`` raises aiormq's RuntimeError ("... closed"): seen to kill a starting stage on CI. While it
    reconnects it has no transport (aio-pika 10's ``reconnecting`` stays False), and ``channel()`` raises
    "Connection was not opened"."""
    if not hasattr(connection, "transport"):
        return False
    transport = connection.transport
    return transport is None or bool(getattr(getattr(transport, "connection", None), "is_closed", False))


# What a Redis outage looks like from redis-py.
REDIS_DOWN: tuple[type[Exception], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    # A Redis Cluster with a master away or its slots moving: CLUSTERDOWN (ClusterDownError, MasterDownError),
    # TRYAGAIN, a slot no node serves, or no node reached after the client's retries (ClusterError).
    redis_errors.ClusterError,
    redis_errors.TryAgainError,
    redis_errors.SlotNotCoveredError,
    ConnectionError,
    TimeoutError,
    OSError,
)


def library_panic(err: BaseException) -> bool:
    """A Rust extension's panic (pyo3's ``PanicException``: tiktoken's on a pathological text). It is a
    BaseException, which ``except Exception`` misses, yet it is one job's failure, not the process's: the stage
    retries the job as after any other error, up to the delivery limit. pyo3 exposes no importable class."""
    return type(err).__name__ == "PanicException"


def job_failure(err: BaseException) -> bool:
    """Whether ``err`` is one job's failure, which the stage shell answers (retry, dead-letter), rather than
    the process's own end (a cancel, an exit, a KeyboardInterrupt), which it lets through."""
    return isinstance(err, Exception) or library_panic(err)


class FareboxError(Exception):
    """Base of every error farebox raises on purpose."""

    code: ClassVar[str] = "internal"


class RetryableError(FareboxError):
    """Transient: trying again later may succeed."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PermanentError(FareboxError):
    """The job cannot succeed as written; retrying is pointless."""


class BlockedError(FareboxError):
    """Policy refuses the job."""

    code: ClassVar[str] = "blocked"


# --- permanent -------------------------------------------------------------------------------
class InvalidRequest(PermanentError):
    code: ClassVar[str] = "invalid_request"


class DeliveryLimitReached(PermanentError):
    """A job of a batch failed on every attempt the delivery limit allows (the broker counts
    attempts for a message of its own; the shell counts them for a job in a batch)."""


class ProviderRejected(PermanentError):
    """The provider answered with a 4xx other than 429: the request itself is wrong."""

    code: ClassVar[str] = "provider_error"


class ProviderExhausted(PermanentError):
    """Retries and every fallback candidate are spent."""

    code: ClassVar[str] = "provider_error"


class DeadlineExceeded(PermanentError):
    code: ClassVar[str] = "timeout"


class ForeignMessage(PermanentError):
    """A message on a queue between stages that the pipeline did not send (auth mode user_id): a producer
    publishing past the intake (the default exchange reaches every queue) is refused, never handled."""

    code: ClassVar[str] = "forbidden"


# --- blocked ---------------------------------------------------------------------------------
class PolicyBlocked(BlockedError):
    code: ClassVar[str] = "blocked"


class BudgetExceeded(BlockedError):
    code: ClassVar[str] = "budget_exceeded"


class Forbidden(BlockedError):
    """The sender may not act for that tenant (a tenant rating another's job, for one)."""

    code: ClassVar[str] = "forbidden"


# --- retryable -------------------------------------------------------------------------------
class ProviderUnavailable(RetryableError):
    """5xx, timeout, connection error, malformed response."""

    code: ClassVar[str] = "provider_error"


class RateLimited(ProviderUnavailable):
    """429; ``retry_after_s`` carries the provider's Retry-After when it sent one."""


class DependencyUnavailable(RetryableError):
    """Redis or the broker cannot be reached right now."""


ERROR_CODES = frozenset(
    {"invalid_request", "blocked", "budget_exceeded", "provider_error", "timeout", "internal", "forbidden"}
)


def describe_validation_error(err: ValidationError, limit: int = 5) -> str:
    """A pydantic error as one line for a typed InvalidRequest: where and what, never the input."""
    parts = []
    for item in err.errors(include_input=False, include_url=False)[:limit]:
        where = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    more = len(err.errors()) - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)
