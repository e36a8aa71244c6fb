"""A RabbitMQ cluster of its own for a test: nodes started from the installed ``rabbitmq-server`` beside the
machine's own broker, on free ports, in a temporary folder, joined into one cluster.

Each node has its own name (``fbt<run><i>@localhost``), AMQP and distribution ports, config file (the system's
/etc/rabbitmq/rabbitmq.conf would put every node on 5672), an empty enabled-plugins file (no management or
Prometheus ports to clash), data and log folders, and the cluster's Erlang cookie in the folder's HOME. The
context manager always stops its nodes (``rabbitmqctl stop``, then SIGKILL of whatever is left) and removes its
folder, whatever happened. Anything that does not answer raises ``ClusterError``: a test fails, never skips.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.ports import free_port
from tests.support.tls import Certificates

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # the real script; /usr/sbin's wrapper switches user and logs
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
START_TIMEOUT_S = 120


class ClusterError(RuntimeError):
    """A node did not start, join or stop as asked; the message says which and how."""


@dataclass
class Node:
    name: str
    port: int
    dist_port: int
    home: Path
    process: subprocess.Popen[bytes] | None = None
    tls_port: int | None = None

    def url(self, user: str = "guest", password: str = "guest") -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/"

    def tls_url(self, ca: Path) -> str:
        """``amqps://`` to the node's TLS listener, trusting ``ca`` (aiormq's ``cafile`` option)."""
        assert self.tls_port is not None, "the node was started without TLS"
        return f"amqps://guest:guest@127.0.0.1:{self.tls_port}/?cafile={ca}"


@dataclass
class RabbitCluster:
    root: Path
    nodes: list[Node] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [n.url() for n in self.nodes]

    def env(self, node: Node | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(HOME=str(self.root), ERL_EPMD_ADDRESS="127.0.0.1", RABBITMQ_CONF_ENV_FILE=str(self.root / "env"))
        if node is not None:
            env.update(
                RABBITMQ_NODENAME=node.name,
                RABBITMQ_NODE_PORT=str(node.port),
                RABBITMQ_DIST_PORT=str(node.dist_port),
                RABBITMQ_CONFIG_FILE=str(node.home / "rabbitmq.conf"),
                RABBITMQ_ENABLED_PLUGINS_FILE=str(self.root / "enabled_plugins"),
                RABBITMQ_MNESIA_BASE=str(node.home / "mnesia"),
                RABBITMQ_LOG_BASE=str(node.home / "log"),
                RABBITMQ_PID_FILE=str(node.home / "pid"),
            )
        return env

    def ctl(self, node: Node, *args: str, timeout: float = 60) -> str:
        try:
            done = subprocess.run(
                [CTL, "-n", node.name, *args],
                env=self.env(),
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ClusterError(f"rabbitmqctl -n {node.name} {' '.join(args)}: no answer in {timeout:.0f}s") from None
        if done.returncode != 0:
            raise ClusterError(
                f"rabbitmqctl -n {node.name} {' '.join(args)} failed ({done.returncode}): "
                f"{(done.stderr or done.stdout).decode(errors='replace').strip()[-600:]}"
            )
        return done.stdout.decode(errors="replace")

    def start_node(self, node: Node) -> None:
        """Start (or start again, with its data: it rejoins the cluster) one node, and wait until it runs."""
        log = (node.home / "console.log").open("ab")
        node.process = subprocess.Popen(
            [SERVER], env=self.env(node), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.await_node(node)

    def await_node(self, node: Node) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if node.process is not None and node.process.poll() is not None:
                raise ClusterError(f"node {node.name} exited ({node.process.returncode}): {self.tail(node)}")
            try:
                self.ctl(node, "await_startup", "--timeout", "10", timeout=20)
                return
            except ClusterError:
                if time.monotonic() > deadline:
                    raise ClusterError(f"node {node.name} did not start: {self.tail(node)}") from None
                time.sleep(1)

    def tail(self, node: Node) -> str:
        with contextlib.suppress(OSError):
            return (node.home / "console.log").read_text(errors="replace")[-800:]
        return "(no log)"

    def stop_node(self, node: Node) -> None:
        """Stop one node (its Erlang VM), as an operator would: its clients' connections are closed."""
        if node.process is None:
            return
        with contextlib.suppress(ClusterError):
            self.ctl(node, "stop", timeout=60)
        self._reap(node)

    def kill_node(self, node: Node) -> None:
        """SIGKILL one node's VM: its clients' connections are reset, nothing is closed cleanly."""
        if node.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGKILL)
        self._reap(node)

    def _reap(self, node: Node) -> None:
        process, node.process = node.process, None
        if process is None:
            return
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        with contextlib.suppress(ProcessLookupError):  # epmd-started children of the session, if any
            os.killpg(process.pid, signal.SIGKILL)

    def running_nodes(self, asking: Node) -> list[str]:
        out = self.ctl(asking, "eval", "rabbit_nodes:all_running().")
        return sorted(n for n in self._names() if n in out)

    def _names(self) -> list[str]:
        return [n.name for n in self.nodes]


def _tls_config(node: Node, certs: Certificates) -> str:
    node.tls_port = free_port()
    return (
        f"listeners.ssl.local = 127.0.0.1:{node.tls_port}\n"
        f"ssl_options.cacertfile = {certs.ca}\nssl_options.certfile = {certs.cert}\n"
        f"ssl_options.keyfile = {certs.key}\nssl_options.verify = verify_none\n"
        "ssl_options.fail_if_no_peer_cert = false\n"
    )


def _prepare(root: Path, count: int, tls: Certificates | None) -> RabbitCluster:
    cluster = RabbitCluster(root)
    cookie = root / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(16).upper())
    cookie.chmod(0o400)
    (root / "enabled_plugins").write_text("[].\n")
    (root / "env").write_text("")  # not the system's rabbitmq-env.conf (NODENAME=rabbit@localhost)
    run = secrets.token_hex(2)
    for i in range(1, count + 1):
        home = root / f"n{i}"
        (home / "log").mkdir(parents=True)
        node = Node(f"fbt{run}{i}@localhost", free_port(), free_port(), home)
        config = f"listeners.tcp.local = 127.0.0.1:{node.port}\n"
        (home / "rabbitmq.conf").write_text(config + (_tls_config(node, tls) if tls else ""))
        cluster.nodes.append(node)
    return cluster


@contextlib.contextmanager
def rabbit_cluster(count: int = 3, tls: Certificates | None = None) -> Iterator[RabbitCluster]:
    """``count`` nodes joined into one cluster (one node: a broker of its own), each also listening for TLS
    with ``tls``'s certificates when given; stopped and removed on the way out, whatever happened."""
    if not (os.access(SERVER, os.X_OK) and os.access(CTL, os.X_OK)):
        raise ClusterError(f"RabbitMQ is not installed here ({SERVER}, {CTL})")
    root = Path(tempfile.mkdtemp(prefix="fb-rabbit-"))
    cluster = RabbitCluster(root)  # empty until prepared: the clean-up below always has one
    try:
        cluster = _prepare(root, count, tls)
        for node in cluster.nodes:  # started together, then waited for: the VMs boot in parallel
            log = (node.home / "console.log").open("ab")
            node.process = subprocess.Popen(
                [SERVER], env=cluster.env(node), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            log.close()
        for node in cluster.nodes:
            cluster.await_node(node)
        first = cluster.nodes[0]
        for node in cluster.nodes[1:]:
            cluster.ctl(node, "stop_app")
            cluster.ctl(node, "join_cluster", first.name)
            cluster.ctl(node, "start_app")
        running = cluster.running_nodes(first)
        if running != sorted(cluster._names()):
            raise ClusterError(f"the cluster formed with {running}, not {cluster._names()}")
        yield cluster
    finally:
        for node in cluster.nodes:
            with contextlib.suppress(Exception):
                cluster.stop_node(node)  # SIGKILLs what does not stop
        shutil.rmtree(root, ignore_errors=True)
