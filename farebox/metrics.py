"""Prometheus metrics, one registry per process, with the seed's names (CONTRACT.md).

Label sets are fixed here so every process exports the same shape; prompts never become labels. Every label
value comes from a bounded set (a policy's names, a catalog's models, fixed words): each value is a series
Prometheus keeps, so a value taken from a job (a tenant) goes through ``tenant_label`` first.
"""

from __future__ import annotations

import functools
import socket
import threading
from collections.abc import Container
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics import MetricWrapperBase

from farebox import health

_M = TypeVar("_M", bound=MetricWrapperBase)

# The tenant label of every tenant the policy does not name: a "*" budget or open intake would otherwise make
# each new tenant name a series. Per-tenant spend for everyone is in `farebox report` (the ledger).
OTHER_TENANT = "other"

REQUESTS = Counter(
    "llm_proxy_request_total",
    "Jobs completed, by model and whether the cache served them",
    ["model", "provider", "cache_hit"],
)
COST = Counter("llm_proxy_cost_total", "USD charged for provider calls", ["model", "provider"])
TENANT_COST = Counter(
    "farebox_tenant_cost_usd_total", "USD charged, by tenant (tenants the policy does not name: other)", ["tenant"]
)
TOKENS_IN = Counter("llm_proxy_token_count_input_total", "Input tokens billed", ["model"])
TOKENS_OUT = Counter("llm_proxy_token_count_output_total", "Output tokens billed", ["model"])
LATENCY = Histogram(
    "llm_proxy_latency_seconds",
    "Provider call latency",
    ["model", "provider"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
SAVINGS = Counter("llm_proxy_savings_total", "USD saved versus the baseline model (routing + cache)")
ERRORS = Counter("llm_proxy_errors_total", "Errors by stage and result code", ["stage", "code"])
RETRIES = Counter("llm_proxy_retries_total", "Provider call retries", ["provider"])
# Only tenants the policy names get a budget gauge: one gauge shared by every other tenant would show whichever
# settled last. Their alerts still count, under "other".
BUDGET_USED = Gauge(
    "llm_proxy_budget_used_ratio",
    "Share of the tenant's budget spent this period (only tenants the policy names)",
    ["tenant", "period"],
)
BUDGET_ALERTS = Counter(
    "farebox_budget_alerts_total",
    "Budget alert thresholds crossed (tenants the policy does not name: other)",
    ["tenant", "threshold"],
)
BATCH_SIZE = Histogram(
    "farebox_batch_jobs",
    "Jobs per message sent to the next stage",
    ["stage"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
# The batch lane (farebox/stages/batch_lane.py): provider batches by what became of them (submitted, ended,
# expired, failed, cancelled, refused), and their jobs by where they went (answered, sync, error).
PROVIDER_BATCHES = Counter("farebox_provider_batches_total", "Provider batches by event", ["provider", "event"])
BATCH_LANE_JOBS = Counter(
    "farebox_batch_lane_jobs_total", "Batch-lane jobs handed on, by outcome", ["provider", "outcome"]
)
REDIS_PIPELINE = Histogram(
    "farebox_redis_pipeline_commands",
    "Redis commands sent together in one pipeline",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
MESSAGES = Counter("farebox_messages_total", "Messages handled by a stage, by outcome", ["stage", "outcome"])
REDIS_UP = Gauge("farebox_redis_available", "1 while this process can reach Redis", ["stage"])
# Experiments and feedback: experiment and arm names come from the policy, sources from its feedback_sources.
EXPERIMENT_JOBS = Counter("farebox_experiment_jobs_total", "Jobs routed by an experiment arm", ["experiment", "arm"])
EXPERIMENT_COST = Counter(
    "farebox_experiment_cost_usd_total", "USD charged for jobs routed by an experiment arm", ["experiment", "arm"]
)
FEEDBACK = Counter(
    "farebox_feedback_total",
    "Jobs given feedback (the first score of each job and source)",
    ["experiment", "arm", "source"],
)
FEEDBACK_SCORE = Counter(
    "farebox_feedback_score_total",
    "Sum of first feedback scores (divide by farebox_feedback_total for the mean; replacements are in the report)",
    ["experiment", "arm", "source"],
)
SHADOW_SKIPPED = Counter(
    "farebox_shadow_skipped_total",
    "Shadow-grading calls not made: reason cap (the experiment's cap reached) or policy (the target refused)",
    ["experiment", "reason"],
)
CACHE_BYPASSED = Counter("farebox_cache_bypassed_total", "Jobs that skipped the cache because Redis was down")


@functools.lru_cache(maxsize=4096)
def _child(metric: MetricWrapperBase, labels: tuple[str, ...]) -> MetricWrapperBase:
    return metric.labels(*labels)


def tenant_label(tenant: str | None, named: Container[str]) -> str:
    """The ``tenant`` label value: the tenant itself when the policy names it (``named``), else "other"."""
    return tenant if tenant is not None and tenant in named else OTHER_TENANT


def child(metric: _M, *labels: str) -> _M:
    """``metric.labels(*labels)``, remembered: prometheus-client checks and converts the values
    and takes a lock on every ``labels`` call, several times per job on the hot path. The cache is
    bounded, the registry is not: ``labels`` must come from a bounded set (see ``tenant_label``)."""
    found: _M = _child(metric, labels)  # type: ignore[assignment]
    return found


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # a line per scrape and per probe is noise
        pass


def start_http_server(port: int, addr: str = "0.0.0.0") -> tuple[WSGIServer, threading.Thread]:
    """prometheus-client's ``start_http_server``, made of the same parts (its WSGI app and threading server,
    served from a daemon thread), with the health probes in front: /livez and /readyz (farebox/health.py)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(ThreadingWSGIServer):
        address_family = family  # an IPv6 host needs an IPv6 socket (as prometheus-client does)

    app = health.with_probes(make_wsgi_app(REGISTRY))
    httpd = make_server(str(sockaddr[0]), port, app, Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="farebox-metrics", daemon=True)
    thread.start()
    return httpd, thread


def serve_metrics(port: int, host: str = "127.0.0.1") -> int:
    """Expose /metrics, /livez and /readyz on ``host:port`` (port 0 = do not serve). Returns the port."""
    if port:
        start_http_server(port, addr=host)
    return port
