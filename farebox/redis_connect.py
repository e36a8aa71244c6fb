"""One Redis URL, three deployments: a single server, a Sentinel-watched master, or a Redis Cluster.

``FAREBOX_REDIS_URL`` takes (the forms are part of the contract):

- ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS), ``unix://...``: one server, as
  redis-py's ``from_url`` reads it;
- ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/master_name[/db]`` (``rediss+sentinel://``:
  TLS to the sentinels and the master): the sentinels (port 26379 unless given) are asked which server is
  ``master_name``'s master, and asked again when it fails over. The credentials are the master's; the query
  keys ``sentinel_username`` and ``sentinel_password`` give the sentinels' own, if they need any;
- ``redis+cluster://[[user]:password@]host[:port][,host[:port]...][/0]`` (``rediss+cluster://``: TLS): any
  nodes of a Redis Cluster (port 6379 unless given); the client learns the rest from them. A cluster has
  only database 0.

The stages' auto-pipelining (farebox/patches/redis_pipelining.py) works over one server or a Sentinel's
master; redis-py's cluster client routes each command to its slot's node itself and pipelining steps aside.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Literal, cast
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel

from farebox.errors import REDIS_DOWN
from farebox.patches.redis_pipelining import ClusterClient, PipeliningRedis

Kind = Literal["server", "sentinel", "cluster"]
SINGLE_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_QUERY_KEYS = frozenset({"sentinel_username", "sentinel_password"})
# redis-py's TLS connection options, which a sentinel or cluster URL passes to every connection it makes (a
# single server's URL hands its whole query to redis-py, which reads these itself)
TLS_QUERY_KEYS = frozenset({"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"})
SENTINEL_TLS_KEYS = TLS_QUERY_KEYS | {"ssl_ca_path"}  # redis-py's cluster client has no ssl_ca_path
CERT_REQS = ("none", "optional", "required")
FORMS = (
    "redis://HOST:PORT/DB, rediss://..., unix://PATH, "
    "redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB] or redis+cluster://HOST:PORT[,HOST:PORT...]"
)


class RedisUrlError(ValueError):
    """FAREBOX_REDIS_URL is not one of the forms farebox reads (raised by settings, so at start)."""


@dataclass(frozen=True)
class RedisTarget:
    """What a Redis URL names. ``url`` is the URL as given (what a single server's client reads)."""

    kind: Kind
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    master: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    tls_options: dict[str, Any] = field(default_factory=dict)


def parse_redis_url(url: str) -> RedisTarget:
    """The deployment a Redis URL names; ``RedisUrlError`` says what is wrong with one it cannot read."""
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in (*SINGLE_SCHEMES, *SENTINEL_SCHEMES, *CLUSTER_SCHEMES):
        raise RedisUrlError(f"Redis URL {_shown(url)!r}: unknown form; expected one of {FORMS}")
    if scheme in SINGLE_SCHEMES:
        return RedisTarget("server", url)
    parts = urlsplit(url)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    hosts = parts.netloc.rpartition("@")[2]
    query = {key: values[-1] for key, values in parse_qs(parts.query, keep_blank_values=True).items()}
    tls = scheme.startswith("rediss")
    path = [p for p in parts.path.split("/") if p]
    tls_keys = SENTINEL_TLS_KEYS if scheme in SENTINEL_SCHEMES else TLS_QUERY_KEYS
    tls_options = _tls_options(url, {k: v for k, v in query.items() if k in tls_keys}, tls)
    if scheme in SENTINEL_SCHEMES:
        unknown = sorted(set(query) - SENTINEL_QUERY_KEYS - SENTINEL_TLS_KEYS)
        if unknown:
            raise RedisUrlError(f"Redis URL {_shown(url)!r}: unknown option(s) {', '.join(unknown)}")
        if not path or len(path) > 2:
            raise RedisUrlError(f"Redis URL {_shown(url)!r}: a Sentinel URL ends in /MASTER_NAME or /MASTER_NAME/DB")
        return RedisTarget(
            "sentinel",
            url,
            nodes=_nodes(url, hosts, 26379),
            master=unquote(path[0]),
            db=_db(url, path[1]) if len(path) == 2 else 0,
            username=username,
            password=password,
            tls=tls,
            sentinel_username=query.get("sentinel_username") or None,
            sentinel_password=query.get("sentinel_password") or None,
            tls_options=tls_options,
        )
    unknown = sorted(set(query) - TLS_QUERY_KEYS)
    if unknown:
        raise RedisUrlError(
            f"Redis URL {_shown(url)!r}: a cluster URL takes only TLS options ({', '.join(sorted(TLS_QUERY_KEYS))}),"
            f" not {', '.join(unknown)}"
        )
    if len(path) > 1 or (path and _db(url, path[0]) != 0):
        raise RedisUrlError(f"Redis URL {_shown(url)!r}: a Redis Cluster has only database 0")
    return RedisTarget(
        "cluster",
        url,
        nodes=_nodes(url, hosts, 6379),
        username=username,
        password=password,
        tls=tls,
        tls_options=tls_options,
    )


def _tls_options(url: str, given: dict[str, str], tls: bool) -> dict[str, Any]:
    if given and not tls:
        raise RedisUrlError(f"Redis URL {_shown(url)!r}: TLS options ({', '.join(sorted(given))}) need a rediss+ URL")
    if given.get("ssl_cert_reqs", "required").lower() not in CERT_REQS:
        raise RedisUrlError(f"Redis URL {_shown(url)!r}: ssl_cert_reqs must be one of {', '.join(CERT_REQS)}")
    if "ssl_check_hostname" in given:
        value = given["ssl_check_hostname"].lower()
        if value not in ("true", "false", "1", "0", "yes", "no"):
            raise RedisUrlError(f"Redis URL {_shown(url)!r}: ssl_check_hostname must be true or false")
        return {**given, "ssl_check_hostname": value in ("true", "1", "yes")}
    return given


def connect_redis(
    url: str, *, pipelining: bool = False, wait_replicas: int = 0, wait_timeout_ms: int = 500, **options: Any
) -> Redis:
    """A client for what ``url`` names; ``options`` are redis-py connection options (timeouts, ...).
    ``pipelining``: commands issued in one turn of the event loop go out as one pipeline (the stages);
    ``wait_replicas``: and each pipeline returns only once that many replicas have its writes."""
    target = parse_redis_url(url)
    if wait_replicas and (not pipelining or target.kind == "cluster"):
        raise RedisUrlError("waiting for Redis replicas needs the stages' pipelining client, not a cluster's")
    client = _client(target, pipelining, options)
    if isinstance(client, PipeliningRedis):
        client.require_replicas(wait_replicas, wait_timeout_ms)
    return client


def _client(target: RedisTarget, pipelining: bool, options: dict[str, Any]) -> Redis:
    url = target.url
    client_class: type[Redis] = PipeliningRedis if pipelining else Redis
    if target.kind == "server":
        return client_class.from_url(url, **options)
    auth: dict[str, Any] = {
        "username": target.username,
        "password": target.password,
        "ssl": target.tls,
        **target.tls_options,
    }
    if target.kind == "sentinel":
        assert target.master is not None
        sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_")}
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(target.nodes),
            sentinel_kwargs={
                **sentinel_options,
                "username": target.sentinel_username,
                "password": target.sentinel_password,
                "ssl": target.tls,
                **target.tls_options,
            },
            **auth,
            **options,
        )
        sentinel_class = SentinelPipeliningRedis if pipelining else SentinelRedis
        return cast(Redis, sentinel.master_for(target.master, redis_class=sentinel_class, db=target.db))
    # The cluster client is not a Redis subclass, but it offers the commands, scripts and pipelines the
    # stages use, routed to each key's node.
    cluster = ClusterClient(startup_nodes=[ClusterNode(host, port) for host, port in target.nodes], **auth, **options)
    return cast(Redis, cluster)


async def ready_redis(client: Redis) -> None:
    """Before a client is used by many tasks at once: a cluster client learns the cluster's nodes now. Left to
    the first commands, redis-py 8.1 replaced the connections some of them were starting on, and those
    failed with AttributeError (seen here on 30 commands issued together to a fresh client)."""
    if isinstance(client, RedisCluster):
        with contextlib.suppress(*REDIS_DOWN):  # a cluster away now is the stages' Redis outage, not a crash
            await client.initialize()


async def _close_sentinels(client: Redis) -> None:
    # A Sentinel-made client's pool keeps the clients of the sentinels it asks; closing the master's client
    # alone would leave their connections open.
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()


class SentinelRedis(Redis):
    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        await _close_sentinels(self)


class SentinelPipeliningRedis(PipeliningRedis):
    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        await _close_sentinels(self)


def _nodes(url: str, hosts: str, default_port: int) -> tuple[tuple[str, int], ...]:
    nodes: list[tuple[str, int]] = []
    for item in (i.strip() for i in hosts.split(",")):
        # An IPv6 address is bracketed ("[::1]:26379"): its colons are not the port's.
        host, _, port = item.partition("]:") if item.startswith("[") else item.partition(":")
        host = host.strip("[]")
        if not host:
            raise RedisUrlError(f"Redis URL {_shown(url)!r}: an empty host in the list {hosts!r}")
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise RedisUrlError(f"Redis URL {_shown(url)!r}: {port!r} is not a port")
        nodes.append((host, int(port) if port else default_port))
    return tuple(nodes)


def _db(url: str, text: str) -> int:
    if not text.isdigit():
        raise RedisUrlError(f"Redis URL {_shown(url)!r}: {text!r} is not a database number")
    return int(text)


def _shown(url: str) -> str:
    """The URL without its passwords (the userinfo's and a Sentinel's ``sentinel_password``), for messages."""
    parts = urlsplit(url) if "://" in url else None
    if parts is None:
        return url
    shown = url.replace(f":{parts.password}@", ":***@", 1) if parts.password else url
    return re.sub(r"(sentinel_password=)[^&#]*", r"\1***", shown)
