"""A Redis master, its replica and a Sentinel watching them, on free ports of this machine, for tests; with
``tls`` certificates, all three speak TLS only (replication and the Sentinel's links too).

The servers keep nothing on disk; everything they write goes in a temporary folder removed with them.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.support.ports import free_ports
from tests.support.tls import Certificates

MASTER_NAME = "fbmaster"
START_TIMEOUT_S = 20.0


@dataclass
class SentinelSet:
    master_port: int
    replica_port: int
    sentinel_port: int
    ca: Path | None = None  # TLS only, with certificates of this CA

    @property
    def url(self) -> str:
        if self.ca is not None:
            return f"rediss+sentinel://127.0.0.1:{self.sentinel_port}/{MASTER_NAME}/0?ssl_ca_certs={self.ca}"
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{MASTER_NAME}/0"

    def client(self, port: int) -> redis.Redis:
        return _client(port, self.ca)

    def sentinel(self) -> redis.Redis:
        return self.client(self.sentinel_port)

    def master_address(self) -> tuple[str, int]:
        with self.sentinel() as s:
            host, port = s.execute_command("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
        return host.decode(), int(port)

    def role(self, port: int) -> str:
        with self.client(port) as r:
            return str(r.execute_command("ROLE")[0].decode())

    def fail_over(self, timeout_s: float = 30.0) -> int:
        """Ask the Sentinel to promote the replica; returns the new master's port once the old one follows it."""
        old = self.master_address()[1]
        with self.sentinel() as s:
            s.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        wait_for(lambda: self.master_address()[1] != old, timeout_s, "the Sentinel to name a new master")
        wait_for(lambda: self.role(old) == "slave", timeout_s, "the old master to follow the new one")
        return self.master_address()[1]


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(redis.RedisError, OSError):
            if check():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.1)


def _client(port: int, ca: Path | None) -> redis.Redis:
    tls = {"ssl": True, "ssl_ca_certs": str(ca)} if ca is not None else {}
    return redis.Redis(port=port, socket_timeout=2, **tls)  # type: ignore[arg-type]


def _listen(port: int, tls: Certificates | None) -> list[str]:
    """A server's (or the Sentinel's) listening arguments: its port, or TLS only on it."""
    if tls is None:
        return ["--port", str(port)]
    return ["--port", "0", "--tls-port", str(port), "--tls-replication", "yes", "--tls-cert-file", str(tls.cert),
            "--tls-key-file", str(tls.key), "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "no"]  # fmt: skip


def _replica_known(sentinel_port: int, ca: Path | None) -> bool:
    with _client(sentinel_port, ca) as s:
        replicas = s.execute_command("SENTINEL", "REPLICAS", MASTER_NAME)
    # It must be up and linked to the master (redis-py gives each replica as a dict of bytes).
    return any(
        b"s_down" not in replica.get(b"flags", b"") and replica.get(b"master-link-status") == b"ok"
        for replica in replicas
    )


@contextlib.contextmanager
def sentinel_set(tls: Certificates | None = None) -> Iterator[SentinelSet]:
    """Start a master, a replica of it and a Sentinel (quorum 1); stop them all whatever happens."""
    folder = Path(tempfile.mkdtemp(prefix="fb-sentinel-"))
    master, replica, sentinel = free_ports(3)
    procs: list[subprocess.Popen[bytes]] = []
    base = ["--save", "", "--appendonly", "no", "--bind", "127.0.0.1", "--dir", str(folder)]
    try:
        for port, extra in ((master, []), (replica, ["--replicaof", "127.0.0.1", str(master)])):
            procs.append(_start(["redis-server", *_listen(port, tls), *base, *extra], folder / f"{port}.log"))
        conf = folder / "sentinel.conf"
        conf.write_text(
            f"bind 127.0.0.1\ndir {folder}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 1\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
            f"sentinel failover-timeout {MASTER_NAME} 10000\n"
        )
        sentinel_argv = ["redis-server", str(conf), "--sentinel", *_listen(sentinel, tls)]
        procs.append(_start(sentinel_argv, folder / "sentinel.log"))
        ca = tls.ca if tls else None
        wait_for(lambda: _replica_known(sentinel, ca), START_TIMEOUT_S, "the Sentinel to see the replica in sync")
        yield SentinelSet(master, replica, sentinel, ca)
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def _start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    if shutil.which(command[0]) is None:
        raise RuntimeError(f"{command[0]} is not installed: the Sentinel tests need it")
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
