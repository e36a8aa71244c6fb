"""A 3-master Redis Cluster of the test's own: three ``redis-server --cluster-enabled yes`` on free ports in a
temporary folder, joined by ``redis-cli --cluster create``. Whatever happens, its servers are stopped and the
folder removed. It raises (never skips) when the servers do not start or the cluster does not form: a run
cannot pass by not testing the cluster."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.ports import free_port, port_is_free
from tests.support.processes import stop_all
from tests.support.tls import Certificates

START_TIMEOUT_S = 20.0


class RedisClusterError(RuntimeError):
    """The test's Redis Cluster did not start."""


@dataclass(frozen=True)
class RedisClusterNodes:
    ports: tuple[int, ...]
    ca: Path | None = None  # the nodes speak TLS only, with certificates of this CA

    @property
    def url(self) -> str:
        """The FAREBOX_REDIS_URL of the cluster (every node listed: the client learns the slots from any)."""
        nodes = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        return f"rediss+cluster://{nodes}?ssl_ca_certs={self.ca}" if self.ca else f"redis+cluster://{nodes}"


def _free_ports(n: int) -> list[int]:
    """Ports free now, with their cluster bus port (port + 10000) free too."""
    ports: list[int] = []
    for _ in range(200):
        port = free_port()
        if port + 10000 < 65536 and port not in ports and port_is_free(port + 10000):
            ports.append(port)
            if len(ports) == n:
                return ports
    raise RedisClusterError("no free ports for a Redis Cluster")


def _cli(port: int, *args: str, timeout: float = 10.0, tls: Certificates | None = None) -> str:
    done = subprocess.run(
        ["redis-cli", *_tls_cli(tls), "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.stdout + done.stderr


def _tls_cli(tls: Certificates | None) -> list[str]:
    return ["--tls", "--cacert", str(tls.ca)] if tls else []


def _tls_server(tls: Certificates | None, port: int) -> list[str]:
    """A node's listening arguments: its port, or TLS only on it (the cluster bus and replication too)."""
    if tls is None:
        return ["--port", str(port)]
    return ["--port", "0", "--tls-port", str(port), "--tls-cluster", "yes", "--tls-replication", "yes",
            "--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key), "--tls-ca-cert-file", str(tls.ca),
            "--tls-auth-clients", "no"]  # fmt: skip


def _wait(what: str, ready: object, deadline: float) -> None:
    assert callable(ready)
    while not ready():
        if time.monotonic() > deadline:
            raise RedisClusterError(f"Redis Cluster: {what} within {START_TIMEOUT_S:.0f} s")
        time.sleep(0.1)


@contextlib.contextmanager
def redis_cluster(
    masters: int = 3, node_timeout_ms: int = 15_000, tls: Certificates | None = None
) -> Iterator[RedisClusterNodes]:
    """A running cluster of ``masters`` masters and no replicas (a node missing ``node_timeout_ms`` is failed),
    speaking TLS only with ``tls``'s certificates when given; stopped and removed on exit."""
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            raise RedisClusterError(f"{tool} is not installed: the Redis Cluster tests need it")
    folder = Path(tempfile.mkdtemp(prefix="farebox-rcluster-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports = _free_ports(masters)
        for port in ports:
            argv = ["redis-server", *_tls_server(tls, port), "--bind", "127.0.0.1", "--cluster-enabled", "yes"]
            argv += ["--cluster-config-file", str(folder / f"nodes-{port}.conf"), "--save", "", "--appendonly", "no"]
            argv += ["--dir", str(folder), "--logfile", str(folder / f"redis-{port}.log")]
            argv += ["--cluster-node-timeout", str(node_timeout_ms)]
            procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + START_TIMEOUT_S
        for port, proc in zip(ports, procs, strict=True):
            if proc.poll() is not None:
                raise RedisClusterError(f"redis-server on port {port} exited ({proc.returncode})")
            _wait(
                f"the server on port {port} did not answer", lambda p=port: "PONG" in _cli(p, "ping", tls=tls), deadline
            )
        nodes = [f"127.0.0.1:{p}" for p in ports]
        created = subprocess.run(
            ["redis-cli", *_tls_cli(tls), "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if created.returncode != 0:
            raise RedisClusterError(f"redis-cli --cluster create failed: {(created.stdout + created.stderr)[-800:]}")
        for port in ports:
            _wait(
                f"the node on port {port} did not reach cluster_state:ok",
                lambda p=port: "cluster_state:ok" in _cli(p, "cluster", "info", tls=tls),
                deadline + 30,
            )
        yield RedisClusterNodes(tuple(ports), tls.ca if tls else None)
    finally:
        stop_all(procs)
        shutil.rmtree(folder, ignore_errors=True)
