"""Free loopback ports for the servers tests start (a Redis, a Sentinel, cluster nodes, a TCP proxy)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port the kernel has no use for now (ephemeral range)."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports, held open together while they are picked so none comes back twice."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False
